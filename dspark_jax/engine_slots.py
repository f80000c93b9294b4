"""How the engine fills its slots: admission from the queue, prefill, and paged-cache pages.

Two ways in for a waiting request (both exact; the engine picks per step):

- a prefill pass (`slot_round.admit`): used when no slot is decoding, so nothing else
  would run this step anyway. Every admitted prompt goes through one packed pass and
  samples its first token; the rows decode in the same step's round.
- chunked prefill mixed into the round (`slot_round.Admission`): used while other slots
  are decoding and `prefill_chunk` > 0 on a slot-cache target with a packed pass. The
  request takes its slot at once, and its prompt rides along in the verification
  passes, up to `prefill_chunk` tokens per round, one request's chunk per round in
  arrival order, as a dense line with its own small attention grid. The round that
  carries a prompt's last chunk samples its first token; the row drafts from the next
  round. On a machine whose every pass has a large fixed cost, this is what
  keeps admissions cheap: a request joins a pass that runs anyway instead of adding one.

Paged mode: a host `PageAllocator` reserves a request's pages when it takes its slot and
the page table reaches the device before the pass that writes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import slot_round
from dspark_jax.errors import DSparkError
from dspark_jax.paged_cache import PageAllocator, PagedKVCache, pages_needed
from dspark_jax.sampling import SamplingParams


class SlotAdmission:
    """Mixin of `Engine`: the queue -> slot path. Expects the engine's host mirrors
    (`_slot_req`, `_temp`, `_max_new`, ...), `_state`, `_stale` and `_waiting`."""

    # ---------------------------------------------------------------- taking slots

    def _take_waiting(self, free: list) -> list:
        """(slot, request) pairs admitted now; in paged mode each reserves its pages and the
        queue stops at the first request the free pages cannot hold (it waits)."""
        take = []
        for s in free:
            if not self._waiting:
                break
            req = self._waiting[0]
            if self.paged:
                rid, n = req.result.request_id, self._reserve_tokens(len(req.prompt), req.result.max_new_tokens)
                if not self.allocator.can_allocate(rid, n):
                    break
                self.allocator.allocate(rid, n)
            take.append((s, self._waiting.popleft()))
        return take

    def _seat(self, s: int, req, now: float) -> None:
        """Give slot s to req: the host mirrors of its per-request facts."""
        self._slot_req[s] = req
        self._temp[s], self._top_k[s], self._top_p[s] = req.temperature, req.top_k, req.top_p
        # n_out counts the first token, which the prefill samples (read back after the round)
        self._max_new[s], self._max_depth[s], self._n_out[s] = req.result.max_new_tokens, req.max_depth, 1
        self._stops[s] = -1
        self._stops[s, :len(req.stop_ids)] = req.stop_ids
        self._stale_host[:, s] = 0.0
        self._recent[s] = self._own_survival[:, s] = 0.0
        self._slot_acc[s] = 0.0  # (the gate's verdicts are keyed by the seated requests)
        self._prefill_at[s] = 0
        self._unlogged[s] = self.dormant  # a request seated while dormant is never drafted for
        req.result.admitted_at = now

    def _unseat(self, take: list) -> None:
        for s, req in reversed(take):  # give the pages and the queue places back
            self._release_pages(req)
            self._slot_req[s] = None
            req.result.admitted_at = None
            self._waiting.appendleft(req)

    def _admit(self, now: float):
        """Take waiting requests into free slots. Returns (slots prefilled by a prefill pass
        now, their first tokens [S]); requests seated for chunked prefill are not among
        them (they are in `_prefilling`)."""
        decoding = [s for s, r in enumerate(self._slot_req) if r is not None and s not in self._prefilling]
        free = [s for s, r in enumerate(self._slot_req) if r is None]
        take = self._take_waiting(free)
        if self.mixing and decoding:
            for s, req in take:
                self._seat(s, req, now)
                self._prefilling.append(s)
            if take and self.paged:
                self._sync_page_table()
            return [], np.zeros(self.slots, np.int32)
        # nothing decodes: one prefill pass, which also restarts any half-prefilled prompt
        restart = [(s, self._slot_req[s]) for s in self._prefilling]
        if not take and not restart:
            return [], np.zeros(self.slots, np.int32)
        for s, req in take:
            self._seat(s, req, now)
        rows_req = restart + take
        width = self._prefill_width(max(len(r.prompt) for _, r in rows_req))
        rows = np.zeros(self.slots, bool)
        prompts = np.zeros((self.slots, width), np.int32)
        lengths = np.ones(self.slots, np.int32)
        seeds = np.zeros(self.slots, np.uint32)
        for s, req in rows_req:
            rows[s], lengths[s], seeds[s] = True, len(req.prompt), req.seed
            prompts[s, :len(req.prompt)] = req.prompt
        try:
            if self.paged:
                self._sync_page_table()
            self._state, self._stale, first = self._run_admit(rows, prompts, lengths, seeds)
        except Exception:
            self._unseat(take)
            raise
        self._prefilling.clear()
        return [s for s, _ in rows_req], first

    # ---------------------------------------------------------------- the prefill pass

    def _prefill_width(self, n: int) -> int:
        w = 16
        while w < n:
            w *= 2
        return min(w, self.max_len)

    def _prefill_budget(self, tokens: int, width: int) -> int:
        """The packed prefill's token bucket: a power of two >= tokens (at least 16), at
        most the dense pass's slots x width."""
        b = 16
        while b < tokens:
            b *= 2
        return min(b, self.slots * width)

    def _prefill_budgets(self, width: int) -> list[int]:
        return sorted({self._prefill_budget(n, width) for n in range(self.slots * width + 1)})

    def _prefill_passes(self, prompt_lens, prefills=None) -> list[tuple[int, int]]:
        """The (width, budget) of prefill passes (`Engine.warmup`): every packed budget at
        the widths of `prompt_lens`, or those of the passes admitting `prefills` (lists
        of prompt lengths admitted together)."""
        if prefills is None:
            return sorted({(w, b) for w in {self._prefill_width(n) for n in prompt_lens}
                           for b in self._prefill_budgets(w)})
        widths = {tuple(p): self._prefill_width(max(p)) for p in prefills if len(p)}
        return sorted({(w, self._prefill_budget(sum(p), w)) for p, w in widths.items()})

    def _run_admit(self, rows, prompts, lengths, seeds, budget: int | None = None, greedy: bool | None = None):
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        if budget is None:
            budget = self._prefill_budget(int(np.sum(np.where(rows, lengths, 0))), prompts.shape[1])
        args = (jnp.asarray(rows), jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32), keys,
                self._sampling(greedy), jnp.asarray(self._max_new), jnp.asarray(self._stops))
        if self.dormant:  # plain decoding's prefill: no taps, nothing for the drafter
            state, self._bare_stale, first = slot_round.admit(self.tcfg, None, self.tparams, None, self._state,
                                                              self._bare_stale, *args, budget=budget)
            return state, self._stale, first
        return slot_round.admit(self.tcfg, self.drafter, self.tparams, self.dparams, self._state, self._stale,
                                *args, budget=budget)

    def _sampling(self, greedy: bool | None = None) -> SamplingParams:
        return SamplingParams(jnp.asarray(self._temp), jnp.asarray(self._top_k), jnp.asarray(self._top_p),
                              greedy=self._promise(greedy))

    def _all_greedy(self) -> bool:
        """Whether every seated request is greedy: the rounds may then promise greedy rows
        (SamplingParams.greedy) and draw by argmax. An empty slot's stale temperature does
        not count: its tokens are never kept."""
        return all(self._temp[s] == 0 for s, r in enumerate(self._slot_req) if r is not None)

    def _promise(self, greedy: bool | None) -> bool:
        """The greedy promise a pass runs under: `greedy` when given (warmup compiles
        either program), else whether every seated request is greedy."""
        return self._all_greedy() if greedy is None else bool(greedy)

    # ---------------------------------------------------------------- chunked prefill

    def _plan_chunks(self):
        """This round's prompt chunk -> (Admission or None, [(slot, start, n)]): the next
        `prefill_chunk` tokens of the first request in `_prefilling` (one line per round)."""
        if not self._prefilling:
            return None, []
        s = self._prefilling[0]
        req = self._slot_req[s]
        p, at = req.prompt, int(self._prefill_at[s])
        n = min(len(p) - at, self.prefill_chunk)
        c = self.prefill_chunk
        tokens, nxt = np.zeros((1, c), np.int32), np.zeros((1, c), np.int32)
        tokens[0, :n] = p[at:at + n]
        follow = p[at + 1:at + n + 1]
        nxt[0, :len(follow)] = follow
        adm = self._admission(tokens, nxt, row=s, length=n, first=at == 0, final=at + n == len(p), seed=req.seed)
        return adm, [(s, at, n)]

    def _admission(self, tokens, nxt, *, row: int, length: int, first: bool, final: bool, seed: int,
                   greedy: bool | None = None):
        """One chunk line and the per-slot arrays, sent to the device in one transfer."""
        return jax.device_put(slot_round.Admission(
            tokens=tokens, next=nxt, rows=np.asarray([row], np.int32), length=np.asarray([length], np.int32),
            first=np.asarray([first]), final=np.asarray([final]), seeds=np.asarray([seed], np.uint32),
            sampling=SamplingParams(self._temp.copy(), self._top_k.copy(), self._top_p.copy(),
                                    greedy=self._promise(greedy)),
            max_new=self._max_new.copy(), stop_ids=self._stops.copy()))

    def _advance_chunks(self, plan) -> list[int]:
        """After the round: move each chunk's start on; returns the slots whose prompt is
        complete (their first token is in the round's info), which now decode."""
        done = []
        for s, at, n in plan:
            self._prefill_at[s] = at + n
            if at + n == len(self._slot_req[s].prompt):
                done.append(s)
                self._prefilling.remove(s)
        return done

    def _empty_admission(self, greedy: bool | None = None):
        """A chunk line with nothing in it (warmup compiles the mixed rounds with it).
        Every line is `prefill_chunk` wide: one compiled variant per round program."""
        z = np.zeros((1, self.prefill_chunk), np.int32)
        return self._admission(z, z, row=0, length=0, first=False, final=False, seed=0, greedy=greedy)

    # ---------------------------------------------------------------- paged mode

    def _init_paged(self, page_size: int, num_pages: int | None, impl: str, interpret: bool) -> PagedKVCache:
        from dspark_jax.config import Qwen3Config

        if not isinstance(self.tcfg, Qwen3Config):
            raise DSparkError(f"the paged engine supports Qwen3 targets only; got {type(self.tcfg).__name__}")
        if page_size < 1:
            raise DSparkError(f"page_size must be >= 1; got {page_size}")
        pages_per_seq = pages_needed(self.max_len + self.gamma + 1, page_size)
        if num_pages is None:  # room for every slot at full length, plus the NULL page
            num_pages = self.slots * pages_per_seq + 1
        self.allocator = PageAllocator(num_pages, page_size)
        c = self.tcfg
        return PagedKVCache.init(num_layers=c.num_hidden_layers, num_pages=num_pages, page_size=page_size,
                                 kv_heads=c.num_key_value_heads, head_dim=c.head_dim, batch=self.slots,
                                 pages_per_seq=pages_per_seq, dtype=c.jnp_dtype, impl=impl, interpret=interpret)

    def _reserve_tokens(self, prompt_len: int, max_new: int) -> int:
        """Tokens reserved at admission: every cache position a round can write (the
        writes stop at prompt + max_new - 2; gamma + 1 more is a margin)."""
        return prompt_len + max_new + self.gamma + 1

    def _release_pages(self, req) -> None:
        if self.paged and req.result.request_id in self.allocator:
            self.allocator.release(req.result.request_id)
            self._table_dirty = True  # the row points at free pages until the next sync

    def _sync_page_table(self) -> None:
        """Send the host page table (one row per slot) to the device cache."""
        rids = [r.result.request_id if r is not None else None for r in self._slot_req]
        table = self.allocator.page_table(rids, self._state.cache.pages_per_seq)
        self._state = self._state.replace(cache=self._state.cache.replace(page_table=jnp.asarray(table)))
        self._table_dirty = False
