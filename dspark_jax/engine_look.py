"""The drafting gate's look at new requests (a mixin of `Engine`, with engine_costs.py).

A request the gate never drafted for has no survival of its own: the gate reads the
running mean for it, and a verdict not to draft would then never learn what the request
is. When such requests are at least half the batch, the gate weighs a look (a drafted
round for them) against what it may find, from the estimates of the requests that
finished lately (`_past_quantiles`). Until a request is drafted for it stays new, so
where plain rounds win (the CPU demo at 4 slots) every verdict weighs the look again;
its draws depend only on what `_look_memo` keys, so a repeated look reuses them. There a
look cost 0.27 ms of host time, nearly half of a verdict's 0.6 ms, and a third of the
looks reuse their draws (the others see another batch, or a request near its end, whose
room cuts its draws)."""

from __future__ import annotations

import collections

import numpy as np

from dspark_jax import scheduler

LOOK_MEMO_SIZE = 64  # distinct looks remembered (cleared when full)


class LookAtNewRequests:
    """Mixin of `Engine`: the past requests' estimates, their quantiles and the look's
    worth. Expects the gate's `_spec_costs`, `_worth`, `_flush_seconds`, `gate_accuracy`,
    `spec_cost_factor`, `gate_margin` and the engine's `plain_sps`, `_max_new`, `_n_out`."""

    def _init_look(self) -> None:
        self._past_estimates: collections.deque = collections.deque(maxlen=32)  # finished requests' estimates
        self._quantiles: np.ndarray | None = None  # their quantiles (`_past_quantiles`)
        self._past_version = 0  # bumped whenever they change (a key of `_look_memo`)
        rng = np.random.default_rng(0)  # `_look_pays`: the kind (past quantile) of the i-th new slot in draw m
        self._look_kinds = np.stack([np.arange(8)] + [rng.permutation(8) for _ in range(self.slots - 1)])
        self._look_memo: dict = {}

    def _look_pays(self, idx: np.ndarray, est: np.ndarray, fresh: np.ndarray,
                   live: np.ndarray) -> tuple[bool, np.ndarray]:
        """Whether a look at the slots never drafted for (`fresh`) is worth what it costs
        -> (verdict, the slots of idx worth drafting for on the estimates with the new
        slots' at the past requests' mean).

        What a look can find: the 8 quantiles of the requests that finished lately
        (`_past_quantiles`, scaled by `gate_accuracy` as the gate's verdicts scale
        estimates) are 8 equally likely kinds of request, and each new slot is one of
        them on its own: in each of 8 draws every new slot takes a kind, from a fixed
        permutation of its own (each slot takes every kind once; two new slots are not
        assumed alike). Per draw, the seconds per token a speculative round saves over a
        plain one (0 where the gate would not draft: within its margin), averaged over
        the draws, times the tokens the batch makes while the new slots run (rows x
        their mean tokens left). What it costs: the look's predicted time, its flush of
        the new slots' backlog (their prompts) included, minus what plain rounds take to
        make the tokens it is expected to make."""
        r = len(idx)
        plain = r * float(self.plain_sps[r])  # tokens/s of a plain round
        if not plain > 0:
            return False, np.zeros(r, bool)
        key = (r, fresh.tobytes(), live.tobytes(), est[~fresh].tobytes(), self._past_version,
               self.gate_accuracy, self.spec_cost_factor, self.gate_margin)
        draws = self._look_memo.get(key)
        if draws is None:
            draws = self._look_draws(est, fresh, live, plain)
            if len(self._look_memo) >= LOOK_MEMO_SIZE:
                self._look_memo.clear()
            self._look_memo[key] = draws
        saved, mean_est, worth, best = draws
        left = float(np.mean(self._max_new[idx[fresh]] - self._n_out[idx[fresh]]))
        benefit = saved * r * max(left, 0.0)
        flush = self._flush_seconds(idx[worth | fresh])
        if flush not in best:
            sps, extra = self._spec_costs(flush)
            best[flush] = scheduler.best_round(mean_est, sps, draft_time=extra)
        theta, tau = best[flush]
        cost = tau / theta - tau / plain if theta > 0 else np.inf
        return bool(benefit > cost), worth

    def _look_draws(self, est: np.ndarray, fresh: np.ndarray, live: np.ndarray,
                    plain: float) -> tuple[float, np.ndarray, np.ndarray, dict]:
        """What `_look_pays` reads beyond the tokens left and the flush: (the seconds a
        token the look may save, averaged over the draws; the estimates with the new
        slots at the past requests' mean; the rows worth drafting for on those; {flush
        seconds: the best round on them}, filled as flushes are asked for)."""
        sps, extra = self._spec_costs()
        past = np.minimum(1.0, self._past_quantiles() * self.gate_accuracy)
        kinds = self._look_kinds[:int(fresh.sum())]  # [F, 8]: each new slot's kind in each draw
        draws = np.repeat(est[None], kinds.shape[1], axis=0)
        draws[:, fresh] = past[kinds.T] * live[None]
        theta, _ = scheduler.best_rounds(draws, sps, draft_time=extra)
        drafts = theta > plain * (1.0 + self.gate_margin)
        saved = float(np.sum(1.0 / plain - 1.0 / theta[drafts])) / kinds.shape[1]
        mean_est = est.copy()
        mean_est[fresh] = past.mean(axis=0)[None, :] * live
        return saved, mean_est, self._worth(mean_est), {}

    def _past_quantiles(self) -> np.ndarray:
        """[8, G]: the survival of the requests that finished lately (their gate
        estimates), at the 1/16, 3/16, ..., 15/16 quantiles per position: what a new
        request may turn out to be."""
        if self._quantiles is None:  # kept until the estimates change (`_remember`)
            self._quantiles = np.quantile(np.asarray(self._past_estimates), (np.arange(8) + 0.5) / 8, axis=0)
        return self._quantiles

    def _remember(self, estimates, clear: bool = False) -> None:
        """Finished requests' gate estimates join those `_past_quantiles` reads (the
        oldest drop out past 32; `clear`: they replace them)."""
        if clear:
            self._past_estimates.clear()
        self._past_estimates.extend(np.array(e, np.float64) for e in estimates)
        self._quantiles = None
        self._past_version += 1
