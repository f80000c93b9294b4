"""The OpenAI-compatible server, live on 127.0.0.1: the official `openai` client and httpx
against one `python -m serve.server` process per module, serving the tiny Qwen3 fixture
with a random DSpark drafter written like a trained one (the bundled pair's size then does
not set the suite's time; `test_server_app` checks that no flags mean the bundled pair).

Parity with `serve.generate`, streamed == plain answers at T=0, seeded n > 1, 64
concurrent streams with some closed early, every kind of bad input, metrics, and (last)
the SIGTERM drain. The queue bound, warm-up, the API key and detokenisation are tested
without an engine in test_server_app.py.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import FIXTURES, cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(FIXTURES, "qwen3_tiny_tied")
MODEL = "tiny-pair"
PROMPTS = ["The capital of France is", "def add(a, b):"]
CHAT = [{"role": "user", "content": "A shop has 12 boxes with 7 apples each. How many apples?"}]


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    from dspark_jax import target
    from tests.helpers import make_block_drafter, write_block_drafter

    tcfg, tparams = target.load(TARGET)
    drafter, dparams = make_block_drafter(tcfg, block_size=4, taps=(0,))
    return write_block_drafter(tmp_path_factory.mktemp("server") / "draft", TARGET, tparams, drafter, dparams)


@pytest.fixture(scope="module")
def server(draft):
    """One server process: 4 slots, 384 positions, programs compiled on first use."""
    env = cpu_env(1)
    proc = subprocess.Popen([sys.executable, "-m", "serve.server", "--port", "0", "--target", TARGET, "--draft", draft,
                             "--served-model-name", MODEL, "--slots", "4", "--max-len", "384", "--max-queue", "64",
                             "--warmup", "none"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 180
    while not ready.wait(0.5):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
    url = re.search(r"http://[\d.]+:\d+", lines[-1]).group(0)
    yield {"url": url, "proc": proc}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(url: str) -> dict:
    """/metrics as {sample name with labels: value}."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_health_and_models(server, client):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_matches_serve_generate_at_t0(client, draft):
    from dspark_jax.serving import GenerateRequest, run_generate
    from dspark_jax.tokenizer import Tokenizer

    ids = Tokenizer(TARGET).encode(PROMPTS[0])
    rec = run_generate(GenerateRequest(target=TARGET, draft=draft, prompt_ids=[",".join(map(str, ids))],
                                       max_new_tokens=24), lambda e: None, stream=False)[0]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert out.choices[0].text == rec["text"]
    assert out.usage.completion_tokens == len(rec["token_ids"]) and out.usage.prompt_tokens == len(ids)
    assert out.choices[0].finish_reason == rec["finish_reason"]
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert by_text.choices[0].text == rec["text"]


def test_streamed_equals_plain_completions(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    for choice in plain.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert mine[-1].finish_reason == choice.finish_reason and all(c.finish_reason is None for c in mine[:-1])
        assert len(mine) <= plain.usage.completion_tokens  # a round's tokens come in one event
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert plain.choices[0].text != plain.choices[1].text


def test_streamed_equals_plain_chat(client):
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage == plain.usage and plain.usage.prompt_tokens > 10


def test_seeded_n_is_reproducible(client):
    ask = dict(model=MODEL, prompt=PROMPTS[1], n=3, seed=1234, temperature=1.0, max_tokens=12)
    a, b = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage == b.usage


def test_stop_string_cuts_the_text(client):
    ask = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**ask).choices[0].text
    assert len(full) > 8, full
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = full[:full.index(stop)]
    cut = client.completions.create(**ask, stop=[stop, "@@"])
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24
    streamed = client.completions.create(**ask, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


async def _many_streams(url: str, expected: dict, count: int, early_every: int) -> tuple[int, int]:
    """`count` concurrent streams; every `early_every`-th closes after its first chunk.
    Returns (completed correctly, closed early)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def one(i: int) -> str:
            early = i % early_every == 0
            body = {"model": MODEL, "prompt": PROMPTS[i % 2], "temperature": 0, "stream": True,
                    "max_tokens": 100 if early else 16, "ignore_eos": early}
            text, finish = "", None
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if early:
                        return "early"
                    choice = json.loads(line[6:])["choices"][0]
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
            return "ok" if (text, finish) == expected[i % 2] else f"wrong: {text!r} {finish}"

        got = await asyncio.gather(*(one(i) for i in range(count)))
    bad = [g for g in got if g not in ("ok", "early")]
    assert not bad, bad[:3]
    return got.count("ok"), got.count("early")


def test_64_concurrent_streams_some_closed_early(server, client):
    url = server["url"]
    expected, tokens = {}, 0
    for k, p in enumerate(PROMPTS):
        out = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        expected[k] = (out.choices[0].text, out.choices[0].finish_reason)
        tokens += 24 * out.usage.completion_tokens  # each prompt is asked 24 times to the end
    before = metrics(url)
    ok, early = asyncio.run(_many_streams(url, expected, 64, 4))
    assert (ok, early) == (48, 16)
    deadline = time.time() + 30
    while True:
        m = metrics(url)
        if m["dspark_num_requests_running"] == 0 and m["dspark_num_requests_waiting"] == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert m["dspark_num_requests_running"] == 0 and m["dspark_num_requests_waiting"] == 0
    cancelled = 'dspark_requests_total{outcome="cancelled"}'
    assert m[cancelled] - before[cancelled] == 16
    generated = m["dspark_generation_tokens_total"] - before["dspark_generation_tokens_total"]
    assert tokens < generated < tokens + 16 * 100  # the early ones stopped before their 100 tokens


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input_gets_openai_error_json(server, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server["url"] + path, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_bad_request_via_client_and_the_server_still_answers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"best_of": 3})
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens


def test_metrics_move(server, client):
    before = metrics(server["url"])
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, extra_body={"top_k": 5})
    after = metrics(server["url"])
    moved = ["dspark_prompt_tokens_total", "dspark_generation_tokens_total", "dspark_engine_rounds_total",
             "dspark_time_to_first_token_seconds_count", "dspark_inter_token_latency_seconds_count",
             "dspark_e2e_request_latency_seconds_count"]
    if any("accepted_tokens_per_pos" in name for name in after):  # the engine drafts
        moved += ["dspark_spec_decode_num_drafts_total", "dspark_spec_decode_num_draft_tokens_total",
                  "dspark_spec_decode_num_verified_tokens_total"]
    for name in moved:
        assert after[name] > before[name], name
    ended = ['dspark_requests_total{outcome="stop"}', 'dspark_requests_total{outcome="length"}']
    assert sum(after[k] for k in ended) == sum(before[k] for k in ended) + 1
    assert after["dspark_num_slots"] == 4
    accepted = "dspark_spec_decode_num_accepted_tokens_total"
    assert after[accepted] >= before[accepted]


def test_sigterm_drains_then_exits_0(server):
    """Last: a stream in flight finishes after SIGTERM, a new request gets 503, exit 0.
    (The stream is long enough to be in flight after the signal's 0.3 s.)"""
    url, proc = server["url"], server["proc"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 360, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and refused.headers.get("retry-after")
        assert httpx.get(url + "/health").status_code == 503
        rest = [first] + [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0
