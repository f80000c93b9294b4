"""The FastAPI app: OpenAI's completions, chat completions and models routes, health
and Prometheus metrics, over one `EngineRunner`.

A generation request is checked in this order: the bearer key (401), the server's state
(503 while warming up or draining), the JSON body (400), parameters the engine cannot
honour (400), the model name (404), the prompt against the context (400), the queue
(429). Streamed answers are server-sent events in OpenAI's chunk format: for each
choice, one event per engine step that brought it text (the step's rounds together),
then a usage chunk if `stream_options.include_usage`, then `data: [DONE]`. A client
that goes away cancels its engine requests at once (Starlette cancels a streaming
response on disconnect; a plain answer watches the connection while it waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark_jax.errors import DSparkError
from serve.http.protocol import (UNSUPPORTED_CHAT, UNSUPPORTED_COMPLETION, APIError, ChatCompletionRequest,
                                 CompletionRequest, check_supported, new_id, now, usage, validation_error)
from serve.http.runner import EngineRunner, Job

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Settings:
    """What the routes need besides the runner."""

    def __init__(self, model_name: str, max_len: int, vocab_size: int, stop_ids, api_key: str | None = None):
        self.model_name, self.max_len, self.vocab_size = model_name, max_len, vocab_size
        self.stop_ids, self.api_key = tuple(stop_ids), api_key


def create_app(runner: EngineRunner, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start(asyncio.get_running_loop())
        yield
        runner.stop()

    app = FastAPI(title="dspark-jax", lifespan=lifespan)
    app.state.runner, app.state.settings = runner, settings
    tokenizer, metrics = runner.tokenizer, runner.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.requests.labels("rejected" if exc.status in (429, 503) else "invalid").inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{settings.model_name}`)",
                           param="model", code="model_not_found")

    async def parse(request: Request, model):
        authorise(request)
        if runner.status != "ok":
            raise APIError(503, f"the server is {runner.status}", type="service_unavailable", code="unavailable",
                           headers={"Retry-After": "1"})
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e) from None

    def room(prompt: list[int], param: str) -> int:
        left = settings.max_len - len(prompt)
        if left < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {settings.max_len} "
                                "tokens, and at least one must be left to generate", param=param,
                           code="context_length_exceeded")
        return left

    def submit(req, prompts: list[list[int]], max_new: list[int]) -> Job:
        base = req.seed if req.seed is not None else secrets.randbits(32)
        seeds = [(base * 1_000_003 + i) % 2**32 for i in range(len(prompts) * req.n)]
        return runner.submit(prompts, req.n, max_new=max_new,
                             temperature=1.0 if req.temperature is None else req.temperature,
                             top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                             seeds=seeds, stop_ids=() if req.ignore_eos else settings.stop_ids,
                             stops=req.stop_strings())

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        check_supported(req, UNSUPPORTED_COMPLETION)
        check_model(req.model)
        prompts = completion_prompts(req.prompt, tokenizer, settings.vocab_size)
        max_new = []
        for prompt in prompts:
            left = room(prompt, "prompt")
            if req.max_tokens is not None and req.max_tokens > left:
                raise APIError(400, f"max_tokens ({req.max_tokens}) + the prompt ({len(prompt)} tokens) exceed "
                                    f"this model's context of {settings.max_len} tokens", param="max_tokens",
                               code="context_length_exceeded")
            max_new.append(req.max_tokens if req.max_tokens is not None else min(DEFAULT_MAX_TOKENS, left))
        job = submit(req, prompts, max_new)
        return await answer(request, job, req, "text_completion", new_id("cmpl"), sum(map(len, prompts)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        check_supported(req, UNSUPPORTED_CHAT)
        check_model(req.model)
        try:
            prompt = tokenizer.encode_chat(req.chat())
        except DSparkError as e:
            raise APIError(400, str(e), param="messages") from None
        left = room(prompt, "messages")
        limit, name = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                       else (req.max_tokens, "max_tokens"))
        if limit is not None and limit > left:
            raise APIError(400, f"{name} ({limit}) + the messages ({len(prompt)} tokens) exceed this model's "
                                f"context of {settings.max_len} tokens", param=name, code="context_length_exceeded")
        job = submit(req, [prompt], [limit if limit is not None else left])
        return await answer(request, job, req, "chat.completion", new_id("chatcmpl"), len(prompt))

    async def answer(request: Request, job: Job, req, kind: str, rid: str, prompt_tokens: int):
        head = {"id": rid, "created": now(), "model": settings.model_name}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return JobStream(job, stream(job, kind, head, include, prompt_tokens), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
        try:
            await until_done(request, job)
        finally:
            job.close()
        if job.error():
            raise APIError(500, job.error(), type="server_error", code="engine_error")
        if kind == "chat.completion":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                        "logprobs": None, "finish_reason": c.finish_reason} for c in job.choices]
        else:
            choices = [{"index": c.index, "text": c.text.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in job.choices]
        return JSONResponse({**head, "object": kind, "choices": choices,
                             "usage": usage(prompt_tokens, job.completion_tokens())})

    async def stream(job: Job, kind: str, head: dict, include_usage: bool, prompt_tokens: int):
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse({**head, "object": obj, "choices": [choice], **extra})

        try:
            if chat:
                for c in job.choices:
                    yield chunk(c.index, None, None, role=True)
            while True:
                for index, text, finish in await job.updates():
                    if finish == "error":
                        yield sse(APIError(500, job.error() or "engine error", type="server_error",
                                           code="engine_error").body())
                        yield "data: [DONE]\n\n"
                        return
                    yield chunk(index, text, finish)
                if job.done:  # and everything it said has been sent
                    break
            if include_usage:
                yield sse({**head, "object": obj, "choices": [], "usage": usage(prompt_tokens,
                                                                                 job.completion_tokens())})
            yield "data: [DONE]\n\n"
        finally:
            job.close()

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [model_card(settings)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorise(request)
        check_model(name)
        return model_card(settings)

    @app.get("/health")
    async def health():
        status = runner.status
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class JobStream(StreamingResponse):
    """A streamed answer that closes its job however the response ends (also when the
    client leaves before the first event, when the body generator never starts)."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def model_card(settings: Settings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "dspark-jax",
            "max_model_len": settings.max_len}


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) -> id lists."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    out = []
    for i, item in enumerate(items):
        ids = tokenizer.encode_plain(item) if isinstance(item, str) else list(item)   # a Llama 3 target's BOS first
        if not ids:
            raise APIError(400, f"prompt {i} is empty", param="prompt", code="invalid_value")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                           param="prompt", code="invalid_value")
        out.append(ids)
    return out


async def until_done(request: Request, job: Job) -> None:
    """Wait until every choice ended; if the client goes away first, return at once
    (the caller's `job.close()` then cancels the engine requests)."""

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    ended = asyncio.ensure_future(job.ended.wait())
    try:
        await asyncio.wait({watcher, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        ended.cancel()
