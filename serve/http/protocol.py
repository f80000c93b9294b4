"""The OpenAI wire format: pydantic request models, response helpers and error JSON.

Requests are validated strictly (a string where a number belongs is a 400, as with
OpenAI) and unknown fields are refused. OpenAI parameters the engine cannot honour are
declared so that a request setting one to anything but its neutral value gets a 400
naming it, rather than being silently ignored. `top_k` and `ignore_eos` are extensions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI parameters the engine cannot honour -> the values that ask for nothing (accepted).
UNSUPPORTED_COMPLETION = {
    "logprobs": (None, 0), "echo": (None, False), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""),
}
UNSUPPORTED_CHAT = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "store": (None, False),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: sample among the k most likely (0 or -1: off)")
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: do not stop at the tokenizer's end-of-sequence ids")
    user: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # accepted by the schema so that a request using them gets a 400 naming the parameter
    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    metadata: dict | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"'stop' takes at most 4 strings; got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "'stop' strings must not be empty", param="stop")
        return stops


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None

    def chat(self) -> list[dict]:
        """The messages as the chat template takes them (developer is the system role)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def check_supported(req: SamplingFields, table: dict) -> None:
    """400 naming the first parameter set to something the engine cannot honour."""
    for name, neutral in table.items():
        value = getattr(req, name)
        if value is not None and not any(value == v for v in neutral):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def validation_error(exc: ValidationError | Any) -> APIError:
    """A pydantic (or FastAPI) validation failure -> a 400 naming the first bad field."""
    errors = exc.errors()
    err = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid" or (err.get("type") == "missing" and not loc):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if err.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = ""
    for p in loc:
        if isinstance(p, int):
            param += f"[{p}]"
        elif "[" in str(p) or str(p).lower() in _TYPE_TAGS:
            continue  # a union member's tag, not a field
        else:
            param += ("." if param else "") + str(p)
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if loc and loc[0] == "prompt" and err.get("type", "").endswith("_type"):
        return APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                             "token id lists", param="prompt", code="invalid_type")
    return APIError(400, f"'{param}': {err.get('msg', 'invalid value')}", param=param or None,
                    code="invalid_type" if err.get("type", "").endswith("_type") else "invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
