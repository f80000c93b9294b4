"""The server's app without a real engine: a stub that emits fixed token ids, served by
uvicorn in a thread. Warm-up (503 then 200), the bounded queue (429 with Retry-After),
the API key (401), an engine failure, streamed text that never splits a UTF-8
character, stop strings, and the command line's usage errors.
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from dspark_jax.engine.results import EngineMetrics, RequestResult
from dspark_jax.serving import bundled_folder
from dspark_jax.tokenizer import Tokenizer
from serve.http.app import Settings, create_app
from serve.http.metrics import ServerMetrics
from serve.http.protocol import UNSUPPORTED_CHAT, ChatCompletionRequest, check_supported
from serve.http.runner import EngineRunner
from serve.http.text import TextStream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "héllo wörld 日本語 😀 ok"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(bundled_folder("target"))


class StubEngine:
    """Stands in for the engine: each step gives every seated request (the first `slots`
    queued) its next token id from `tokens`, until its max_new_tokens. `gate` cleared:
    steps wait; `fail`: a step raises; `delay`: seconds per step."""

    gamma = 0

    def __init__(self, tokens, slots=1):
        self.tokens, self.slots = list(tokens), slots
        self.results, self.metrics, self.clock = {}, EngineMetrics(), time.perf_counter
        self.gate, self.fail, self.delay = threading.Event(), False, 0.002
        self.gate.set()
        self._lock, self._queue, self._cancels, self._next = threading.Lock(), [], [], 0

    def submit(self, prompt, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=(),
               max_depth=None, on_tokens=None):
        with self._lock:
            rid, self._next = self._next, self._next + 1
            res = self.results[rid] = RequestResult(rid, len(prompt), max_new_tokens, submitted_at=self.clock())
            self._queue.append((res, on_tokens))
        return rid

    def cancel(self, rid):
        with self._lock:
            self._cancels.append(rid)

    @property
    def idle(self):
        return not self._queue

    @property
    def running(self):
        return min(len(self._queue), self.slots)

    @property
    def waiting(self):
        return max(len(self._queue) - self.slots, 0)

    def forget(self, rid):
        if rid in self.results and self.results[rid].finished:
            del self.results[rid]

    def _finish(self, res, on_tokens, reason):
        res.finished, res.finish_reason, res.finished_at = True, reason, self.clock()
        on_tokens(res.request_id, [], True)

    def step(self):
        self.gate.wait()
        if self.fail:
            raise RuntimeError("the device caught fire")
        with self._lock:
            cancels, self._cancels = set(self._cancels), []
            for item in [q for q in self._queue if q[0].request_id in cancels]:
                self._queue.remove(item)
                self._finish(*item, "cancelled")
            seated = self._queue[:self.slots]
        self.metrics.rounds += 1
        for res, on_tokens in seated:
            res.admitted_at = res.admitted_at or self.clock()
            res.first_token_at = res.first_token_at or self.clock()
            res.token_ids.append(self.tokens[len(res.token_ids) % len(self.tokens)])
            on_tokens(res.request_id, res.token_ids[-1:], False)
            if len(res.token_ids) >= res.max_new_tokens:
                with self._lock:
                    self._queue.remove((res, on_tokens))
                self._finish(res, on_tokens, "length")
        time.sleep(self.delay)


@contextlib.contextmanager
def served(engine, tokenizer, max_queue=4, warmup=None, api_key=None):
    """The app on 127.0.0.1 (a free port), in a thread -> its base URL."""
    runner = EngineRunner(engine, tokenizer, ServerMetrics(engine.slots, 0), max_queue=max_queue, warmup=warmup)
    app = create_app(runner, Settings("stub", 64, tokenizer.vocab_size, tokenizer.stop_ids, api_key))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(10)


def test_health_is_503_until_warm(tokenizer):
    warm = threading.Event()
    with served(StubEngine([5]), tokenizer, warmup=lambda engine: warm.wait(10)) as url:
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        warm.set()
        deadline = time.time() + 5
        while httpx.get(url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_full_queue_answers_429_with_retry_after(tokenizer):
    engine = StubEngine([5], slots=1)
    engine.gate.clear()  # nothing finishes until the gate opens
    body = {"prompt": "hi", "max_tokens": 3, "stream": True}
    with served(engine, tokenizer, max_queue=2) as url, httpx.Client(base_url=url, timeout=10) as http:
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(http.stream("POST", "/v1/completions", json=body)) for _ in range(3)]
            assert all(s.status_code == 200 for s in streams)
            full = http.post("/v1/completions", json={"prompt": "hi"})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
            assert http.post("/v1/completions", json={"prompt": "hi", "n": 2}).status_code == 429
            engine.gate.set()
            for s in streams:
                assert "data: [DONE]" in list(s.iter_lines())
        assert http.post("/v1/completions", json={"prompt": "hi", "n": 3}).status_code == 200
        assert http.post("/v1/completions", json={"prompt": "hi", "n": 4}).json()["error"]["param"] == "n"
        metrics = http.get("/metrics").text
        assert 'dspark_requests_total{outcome="rejected"} 2.0' in metrics


def test_api_key(tokenizer):
    with served(StubEngine([5]), tokenizer, api_key="sekret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(model="stub", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_engine_failure_is_an_error_not_a_hang(tokenizer):
    engine = StubEngine([5])
    engine.fail = True
    with served(engine, tokenizer) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 500 and "caught fire" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["status"].startswith("failed")


def test_a_client_that_leaves_cancels_its_request(tokenizer):
    engine = StubEngine([5])
    engine.delay = 0.05  # 60 tokens take 3 s
    with served(engine, tokenizer, max_queue=0) as url:
        body = {"prompt": "hi", "max_tokens": 60}
        for stream in (False, True):
            if stream:  # leave after the first event
                with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    next(line for line in r.iter_lines() if line.startswith("data: "))
            else:  # give up waiting for the answer
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/v1/completions", json=body, timeout=0.3)
            deadline = time.time() + 5
            while not engine.idle and time.time() < deadline:
                time.sleep(0.02)
            assert engine.idle  # the slot is free again well before its 60 tokens
            time.sleep(0.2)  # and the server has heard so (the queue bound counts it free)
        assert 'dspark_requests_total{outcome="cancelled"} 2.0' in httpx.get(url + "/metrics").text
        engine.delay = 0.002
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_streamed_text_never_splits_a_utf8_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    with served(StubEngine(ids), tokenizer) as url:
        body = {"prompt": "hi", "max_tokens": len(ids), "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events]
    assert "".join(texts) == TEXT and not any("\ufffd" in t for t in texts)
    assert len(texts) < len(ids)  # the ids of one character arrive in different rounds, its text once


def test_text_stream_holds_back_broken_characters_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode(TEXT)
    ts = TextStream(tokenizer)
    parts = [ts.add([i]) for i in ids] + [ts.finish()]
    assert "".join(parts) == TEXT and all("\ufffd" not in p for p in parts) and ts.tokens == len(ids)
    ts = TextStream(tokenizer, ["本語", "zz"])
    parts = [ts.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [ts.finish()]
    assert "".join(parts) == "héllo wörld 日" and ts.stopped
    assert tokenizer.decode(ids[:ts.tokens]).endswith("本語")  # counted up to the id completing the stop
    ts = TextStream(tokenizer, ["ok!"])  # a stop string's prefix at the end is released when no stop follows
    assert ts.add(ids) + ts.finish() == TEXT and not ts.stopped


def test_neutral_values_of_unsupported_parameters_are_accepted():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "logprobs": False,
                                                "presence_penalty": 0, "tool_choice": "none", "tools": []})
    check_supported(req, UNSUPPORTED_CHAT)


def test_cli_usage_errors_are_one_line_exit_2():
    for argv, needle in [(["--slots", "x"], "invalid int value"), (["--port", "99999"], "--port must be"),
                         (["--target", "/nonexistent/folder"], "/nonexistent/folder")]:
        proc = subprocess.run([sys.executable, "-m", "serve.server", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


def test_no_flags_mean_the_bundled_pair():
    """`python -m serve.server` and `serve.generate` with no --target resolve the bundled
    target and DSpark drafter (the live server test serves a tiny fixture pair instead)."""
    from dspark_jax.serving import GenerateRequest, resolve_folders

    tfolder, dfolder, kind = resolve_folders(GenerateRequest())
    assert (tfolder, dfolder, kind) == (bundled_folder("target"), bundled_folder("dspark"), "auto")
    assert tfolder == os.path.join(REPO, "artifacts", "demo", "target") and os.path.isdir(dfolder)
