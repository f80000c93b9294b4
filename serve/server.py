"""An OpenAI-compatible streaming HTTP server on the engine.

    python -m serve.server                                   # the bundled demo pair, 127.0.0.1:8000
    python -m serve.server --target T --draft D --slots 16 --max-len 4096 --api-key KEY

It prints `serving MODEL on http://HOST:PORT` once it is ready to answer (`--port 0`
picks a free port). SIGTERM drains: new requests get 503, those in flight finish, then
it exits 0. The routes live in `serve/http/`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import prometheus_client
import uvicorn

from dspark_jax.errors import EXIT_USAGE, DefaultsFormatter, DSparkError, cli_errors

PROG = "python -m serve.server"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from serve.generate import DRAFTERS, POLICIES
    from serve.http.setup import WARMUPS

    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0],
                      formatter_class=DefaultsFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--target", help="Hugging Face target folder (default: the bundled demo target)")
    p.add_argument("--draft", help="DeepSpec drafter folder (default: the bundled drafter for --drafter)")
    p.add_argument("--drafter", default=None, choices=DRAFTERS,
                   help="drafter kind (default: what --draft holds; none = plain decoding)")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="verification policy (default: production when a profile of this backend, model pair, "
                        "mesh and slot count exists, else fixed)")
    p.add_argument("--sps-file", default=None, help="profile file (default: ~/.cache/dspark_jax/sps.json)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL device mesh")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per request, prompt plus completion (default: the model's, at most 2048)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="completion choices that may wait for a slot; past it requests get 429")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: dspark-demo for the bundled pair, else the target "
                        "folder's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--warmup", default="rounds", choices=WARMUPS,
                   help="programs compiled before /health says ok: rounds (every round program and short "
                        "prompts' prefill), full (every prompt width too) or none (each on first use)")
    p.add_argument("--buckets", default="auto", choices=("auto", "pow2", "full"),
                   help="verification budget buckets (auto: one full bucket on CPU, powers of two elsewhere)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per round that ride along in the verification pass while other slots decode "
                        "(0: a prefill pass per admission)")
    p.add_argument("--rounds-per-call", type=int, default=4, help="rounds per dispatch when nothing waits")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (info and debug log each request)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with cli_errors("serve.server"):
        from dspark_jax import mesh as mesh_lib

        data, model = mesh_lib.parse_mesh(args.mesh)
        mesh_lib.simulate_cpu_devices(data * model)  # before jax starts
        from serve.http.app import Settings, create_app
        from serve.http.metrics import ServerMetrics
        from serve.http.runner import EngineRunner
        from serve.http.setup import ServeOptions, build

        if not 0 <= args.port < 65536:
            raise DSparkError(f"--port must be in [0, 65535]; got {args.port}")
        logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
        prometheus_client.disable_created_metrics()  # no *_created samples beside each counter
        opts = ServeOptions(**{k: v for k, v in vars(args).items() if k not in ("host", "port", "log_level")})
        served = build(opts, say=lambda line: print(f"serve.server: {line}", file=sys.stderr, flush=True))
        engine = served.engine
        runner = EngineRunner(engine, served.tokenizer, ServerMetrics(engine.slots, engine.gamma),
                              max_queue=args.max_queue, warmup=served.warmup)
        app = create_app(runner, Settings(served.model_name, served.max_len, served.vocab_size,
                                          served.tokenizer.stop_ids, args.api_key))
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=args.log_level in ("debug", "info"), timeout_graceful_shutdown=None)
        ready = (f"serving {served.model_name} on http://{{}} (policy {served.policy}, {engine.slots} slots, "
                 f"context {served.max_len})")
        DrainingServer(config, runner, ready).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a draining SIGTERM and a ready line."""

    def __init__(self, config, runner, ready_line: str):
        super().__init__(config)
        self.runner, self.ready_line, self.announced = runner, ready_line, False

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.runner.draining and not self.should_exit:
            self.runner.draining = True  # refuse new requests; on_tick exits once in-flight ones are done
            print("serve.server: SIGTERM: draining", file=sys.stderr, flush=True)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if not self.announced and self.started and self.runner.ready:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(self.ready_line.format(f"{host}:{port}"), flush=True)
            self.announced = True
        if self.runner.draining and not self.runner.busy:
            return True
        return await super().on_tick(counter)


if __name__ == "__main__":
    main()
