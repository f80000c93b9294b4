"""Load benchmark of the engine: aggregate throughput vs per-user speed for each policy.

For every policy (no speculation, fixed depth 1 (MTP-1-like), fixed gamma, static
threshold, Algorithm 1, production variant), every concurrency level c (an engine with
c slots) and every arrival mode:

- closed loop: c clients, each submits its next request when the previous one ends;
- Poisson: c x requests_per_client requests arrive at `rate` x c requests/s; they
  queue when every slot is busy.

Each point first runs its workload once untimed on its own engine (compiling what the
timed runs use), then its timed runs, interleaved across policies. Rows report aggregate
tokens/s, mean per-user tokens/s, mean verified budget B per round, tau, and two measures
of the host on the critical path:

- `host_exposed_frac`: the run's wall time minus its device time (every round that ran
  and every prefill pass, its program timed back to back on device-resident inputs over
  as many rows as took part), over the wall time less the prefill passes' device time:
  the share of the decoding time in which the device waited for the host or ran slower
  for sharing the machine with it;
- `device_idle_frac`: the share of the wall time with no call on the device, measured
  directly (device_watch.py).
A point with several timed runs reports the median-throughput run and the median of the
runs' two host measures.

load_report.py writes the table, the plots and results.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from dspark_jax.engine import SCHEDULED as SCHEDULED_POLICIES, Engine, profiles
from dspark_jax.engine import round as rnd
from dspark_jax.engine.costs import stored_costs
from dspark_jax.errors import DSparkError
from serve import speedup
from serve.device_watch import DeviceWatch

POLICIES = ("none", "mtp1", "fixed", "threshold", "algorithm1", "production")
MODES = ("closed", "poisson")
BUCKETS = ("auto", "pow2", "full")
LABELS = {"none": "no speculation", "mtp1": "fixed depth 1 (MTP-1)", "fixed": "fixed gamma",
          "threshold": "static threshold", "algorithm1": "Algorithm 1", "production": "production variant"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadSettings:
    concurrency: tuple[int, ...] = (1, 2)
    policies: tuple[str, ...] = POLICIES
    modes: tuple[str, ...] = ("closed",)
    requests_per_client: int = 2
    prompt_len: int = 16
    max_new_tokens: int = 16
    rate: float = 4.0           # Poisson: requests/s per slot
    threshold: float = 0.5
    temperature: float = 0.0
    seed: int = 0
    max_len: int | None = None  # default: prompt + the longest request, rounded up to 16
    sps_file: str | None = None
    buckets: str = "auto"       # "pow2" | "full" (one program per engine) | "auto": full on CPU
    repeats: int = 1            # timed runs per point, interleaved across policies; the median is reported
    length_spread: float = 0.0  # request i asks for max_new_tokens x U[1 - s, 1 + s] (seeded, same for all policies)
    prefill_chunk: int = 64     # chunked-prefill tokens per round (0: a separate prefill pass per admission)
    stop_ids: tuple[int, ...] = ()  # a request also ends at one of these (served text ends at its turn's end)
    rounds_per_call: int = 4    # rounds per dispatch when nothing waits for admission
    lag: int = 1                # rounds in flight before the host reads one back
    device_time: bool = True    # replay the run's programs for host_exposed_frac

    def __post_init__(self):
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise DSparkError(f"unknown policy {bad[0]} (choose from {', '.join(POLICIES)})")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise DSparkError(f"unknown arrival mode {bad[0]} (choose from {', '.join(MODES)})")
        if not self.concurrency or min(self.concurrency) < 1:
            raise DSparkError("concurrency levels must be >= 1")
        for name in ("requests_per_client", "prompt_len", "max_new_tokens", "repeats", "rounds_per_call"):
            if getattr(self, name) < 1:
                raise DSparkError(f"{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.prefill_chunk < 0 or self.lag < 0:
            raise DSparkError(f"prefill-chunk and lag must be >= 0; got {self.prefill_chunk}, {self.lag}")
        if not 0.0 <= self.length_spread < 1.0:
            raise DSparkError(f"length spread must be in [0, 1); got {self.length_spread}")
        if self.rate <= 0:
            raise DSparkError(f"rate must be > 0; got {self.rate}")
        if self.buckets not in BUCKETS:
            raise DSparkError(f"unknown bucket set {self.buckets} (choose from {', '.join(BUCKETS)})")

    @property
    def cache_len(self) -> int:
        longest = int(np.ceil(self.max_new_tokens * (1 + self.length_spread)))
        return self.max_len or -(-(self.prompt_len + longest) // 16) * 16

    def bucket_set(self, slots: int, gamma: int) -> tuple[int, ...]:
        """The engine's budget buckets. "auto" is one full bucket on CPU, where compiling
        dominates a short run and a tiny model's pass costs about the same at any budget."""
        import jax

        full = self.buckets == "full" or (self.buckets == "auto" and jax.default_backend() == "cpu")
        return (slots * (1 + gamma),) if full else profiles.budget_buckets(slots, gamma)


@dataclasses.dataclass
class LoadRow:
    policy: str
    mode: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    throughput: float        # aggregate tokens/s
    per_user: float          # mean over requests of tokens/s from admission to last token
    mean_verified: float     # mean verified tokens B per round
    mean_budget: float       # mean compiled bucket N_b per round
    tau: float
    errors: int = 0
    plain_rounds: int = 0       # rounds run without drafting
    rounds: int = 0             # the engine's rounds
    device_seconds: float = 0.0  # the run's programs replayed back to back
    host_exposed_frac: float = 0.0  # (wall - device) / (wall - prefill passes' device time); runs' median
    device_idle_frac: float = 0.0   # share of the wall time with no call on the device (device_watch.py); median
    runs: int = 1               # timed runs behind the row (the median-throughput one is reported)
    throughput_min: float = 0.0
    throughput_max: float = 0.0
    repeat_throughputs: tuple = ()  # every timed run's throughput, in run order (runs interleave across policies)


def engine_options(policy: str, gamma: int, threshold: float) -> dict:
    """Engine keyword arguments of a benchmark policy."""
    if policy == "none":
        return {"policy": "none"}
    if policy == "mtp1":
        return {"policy": "fixed", "depth": min(1, gamma)}
    if policy == "fixed":
        return {"policy": "fixed", "depth": gamma}
    if policy == "threshold":
        return {"policy": "threshold", "threshold": threshold}
    return {"policy": policy}


def _drive(engine: Engine, prompts, settings: LoadSettings, mode: str, clients: int,
           clock: Callable[[], float], sleep: Callable[[float], None]):
    """Submit the workload and step until done; returns the results."""
    total = clients * settings.requests_per_client
    lengths = request_lengths(settings, total)
    submitted = []
    ended = [0]

    def on_tokens(rid, tokens, finished):
        ended[0] += finished

    def submit():
        i = len(submitted)
        submitted.append(engine.submit(prompts[i % len(prompts)], seed=settings.seed + i,
                                       max_new_tokens=int(lengths[i]), temperature=settings.temperature,
                                       stop_ids=settings.stop_ids, on_tokens=on_tokens))

    if mode == "closed":
        for _ in range(min(clients, total)):
            submit()
        while not engine.idle:
            engine.step()
            while ended[0] and len(submitted) < total:
                ended[0] -= 1
                submit()
    else:
        rng = np.random.default_rng(settings.seed)
        arrivals = np.cumsum(rng.exponential(1.0 / (settings.rate * clients), total))
        t0 = clock()
        while len(submitted) < total or not engine.idle:
            now = clock() - t0
            while len(submitted) < total and arrivals[len(submitted)] <= now:
                submit()
            if engine.idle and len(submitted) < total:
                sleep(max(0.0, arrivals[len(submitted)] - (clock() - t0)))
                continue
            engine.step()
    return [engine.results[r] for r in submitted]


def request_lengths(settings: LoadSettings, count: int) -> np.ndarray:
    """max_new_tokens of requests 0..count-1: all equal, or spread around the setting
    (seeded: every policy serves the same requests)."""
    n = settings.max_new_tokens
    if settings.length_spread == 0:
        return np.full(count, n, np.int64)
    rng = np.random.default_rng(settings.seed + 7919)
    s = settings.length_spread
    return np.maximum(1, np.rint(n * rng.uniform(1 - s, 1 + s, count))).astype(np.int64)


def make_engine(tcfg, tparams, drafter, dparams, policy: str, clients: int, settings: LoadSettings,
                costs: dict | None = None) -> Engine:
    """The engine of one benchmark point (`costs`: the profile, for the scheduled policies)."""
    gamma = drafter.gamma if drafter is not None else 0
    return Engine(tcfg, tparams, drafter, dparams, slots=clients, max_len=settings.cache_len,
                  buckets=settings.bucket_set(clients, gamma), prefill_chunk=settings.prefill_chunk,
                  rounds_per_call=settings.rounds_per_call, lag=settings.lag,
                  max_stop_ids=max(4, len(settings.stop_ids)),
                  **(costs if policy in SCHEDULED_POLICIES else {}), **engine_options(policy, gamma, settings.threshold))


def host_exposed(engine: Engine, seconds: float, repeats: int = 5) -> tuple[float, float]:
    """(device seconds, exposed host fraction) of a run of `seconds` wall time that left
    `engine` idle: every program it called, replayed back to back on device-resident
    inputs over as many rows as took part in the call, times its calls; the fraction is
    (wall - device) / (wall - the prefill passes' device time)."""
    dev = {(key, rows): n * engine.program_seconds(key, repeats, rows=rows)
           for (key, rows), n in engine.metrics.calls.items()}
    total = sum(dev.values())
    decoding = seconds - sum(t for (key, _), t in dev.items() if key[0] == "prefill")
    return total, (seconds - total) / decoding if decoding > 0 else 0.0


def run_point(tcfg, tparams, drafter, dparams, policy: str, mode: str, clients: int, settings: LoadSettings,
              prompts, costs: dict | None = None, clock=time.perf_counter, sleep=time.sleep,
              engine: Engine | None = None) -> tuple[LoadRow, Engine]:
    """One (policy, mode, concurrency) timed run on `engine` (made and warmed by an untimed
    run of the same workload when None). Returns the row and the engine for the next run."""
    if engine is None:
        engine = make_engine(tcfg, tparams, drafter, dparams, policy, clients, settings, costs)
        _drive(engine, prompts, settings, "closed", clients, clock, sleep)  # compiles what the run needs
        if mode != "closed":  # arrival timing may reach other buckets and prefill widths: compile them all
            total = clients * settings.requests_per_client
            engine.warmup(sorted({len(prompts[i % len(prompts)]) for i in range(total)}),
                          greedy=(settings.temperature == 0,))
    for _ in range(3):  # a run that compiled a program (one the warm-up did not reach) is run again
        compiled = rnd.compiled_programs()
        engine.metrics = type(engine.metrics)()
        gc.collect()
        gc.disable()  # a collection pause inside a 1-s run reads as a slower policy
        try:
            with DeviceWatch(engine, clock) if settings.device_time else contextlib.nullcontext() as watch:
                t0 = clock()
                results = _drive(engine, prompts, settings, mode, clients, clock, sleep)
                secs = clock() - t0
        finally:
            gc.enable()
        if rnd.compiled_programs() == compiled:
            break
    dev, exposed = host_exposed(engine, secs) if settings.device_time else (0.0, 0.0)
    ok = [r for r in results if r.error is None]
    tokens = sum(len(r.token_ids) for r in ok)
    rounds = sum(r.rounds for r in ok)
    m = engine.metrics
    row = LoadRow(policy=policy, mode=mode, concurrency=clients, requests=len(results), tokens=tokens,
                  seconds=secs, throughput=tokens / secs if secs > 0 else 0.0,
                  per_user=statistics.fmean(r.tokens_per_second for r in ok) if ok else 0.0,
                  mean_verified=m.mean_verified, mean_budget=m.mean_budget,
                  tau=sum(len(r.token_ids) - 1 for r in ok) / rounds if rounds else 0.0,
                  errors=len(results) - len(ok), plain_rounds=m.plain_rounds, rounds=m.rounds,
                  device_seconds=dev, host_exposed_frac=exposed,
                  device_idle_frac=watch.idle_seconds / secs if watch is not None and secs > 0 else 0.0,
                  throughput_min=tokens / secs if secs > 0 else 0.0, throughput_max=tokens / secs if secs > 0 else 0.0)
    return row, engine


def profile_costs(tcfg, drafter, clients: int, settings: LoadSettings) -> dict:
    """The scheduled policies' profile for an engine of `clients` slots (an error naming
    the command that makes it when there is none)."""
    g = drafter.gamma
    buckets = settings.bucket_set(clients, g)
    key = profiles.profile_key(tcfg, slots=clients, gamma=g, max_len=settings.cache_len,
                               tap_layers=drafter.tap_layers, drafter=drafter)
    costs = stored_costs(settings.sps_file, key, buckets, any_length=True)
    if costs is None:
        raise DSparkError(f"no profile for {clients} slots in {settings.sps_file or profiles.default_path()}; "
                          f"make one with `python -m serve.profile_sps --slots {clients} --max-len "
                          f"{settings.cache_len}" + (f" --out {settings.sps_file}`" if settings.sps_file else "`"))
    return costs


def run(tcfg, tparams, drafter, dparams, settings: LoadSettings, progress: Callable[[LoadRow], None] | None = None,
        prompts=None) -> list[LoadRow]:
    """Every (mode, policy, concurrency) point; `prompts` (token id lists, at most
    settings.prompt_len long) replace the default random-token prompts."""
    import jax

    if drafter is None and any(p != "none" for p in settings.policies):
        raise DSparkError("speculative policies need a drafter (pass --draft DIR or --policy none)")
    if prompts is None:
        prompts = speedup.random_prompts(max(settings.concurrency) * settings.requests_per_client,
                                         settings.prompt_len, tcfg.vocab_size, seed=settings.seed)
    runs: dict[tuple[str, str, int], list[LoadRow]] = {}
    for c in settings.concurrency:
        costs = profile_costs(tcfg, drafter, c, settings) if any(
            p in SCHEDULED_POLICIES for p in settings.policies) else None
        for mode in settings.modes:
            engines: dict[str, Engine] = {}
            for rep in range(settings.repeats):  # interleaved, so slow drifts of the machine hit every policy
                # every other repeat runs the policies in reverse, so no policy always runs first or last
                for policy in settings.policies if rep % 2 == 0 else settings.policies[::-1]:
                    row, engines[policy] = run_point(tcfg, tparams, drafter if policy != "none" else None, dparams,
                                                     policy, mode, c, settings, prompts, costs=costs,
                                                     engine=engines.get(policy))
                    runs.setdefault((mode, policy, c), []).append(row)
                    if progress is not None:
                        progress(row)
        # every concurrency level compiles its own programs; dropping them keeps a long
        # sweep from exhausting the process's memory maps (XLA:CPU maps each executable)
        jax.clear_caches()
    return [median_row(runs[(mode, policy, c)]) for mode in settings.modes for policy in settings.policies
            for c in settings.concurrency]


def median_row(runs: Sequence[LoadRow]) -> LoadRow:
    """The run with the median throughput (the lower middle one for an even count),
    carrying the spread of all runs and the median of their host measures (each run's
    is noisy on a shared machine)."""
    ordered = sorted(runs, key=lambda r: r.throughput)
    mid = ordered[(len(ordered) - 1) // 2]
    return dataclasses.replace(mid, runs=len(runs), throughput_min=ordered[0].throughput,
                               host_exposed_frac=statistics.median(r.host_exposed_frac for r in runs),
                               device_idle_frac=statistics.median(r.device_idle_frac for r in runs),
                               throughput_max=ordered[-1].throughput,
                               repeat_throughputs=tuple(r.throughput for r in runs))
