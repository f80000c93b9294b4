"""The slot table: which request holds which slot, the host's per-slot tables, the
waiting queue, and how a waiting request gets in.

Two ways in (both exact; the engine picks per dispatch):
- a prefill pass (`round.prefill`) when no slot holds a request (nothing else would run)
  or when chunks cannot ride along (paged cache, a target without a packed pass,
  prefill_chunk 0): every admitted prompt goes through one packed pass and samples its
  first token; the rows decode from the round dispatched right after it;
- chunked prefill (`round.Admission`): the request takes its slot at once and its prompt
  rides along in the rounds' verification passes, `prefill_chunk` tokens a round, one
  request's chunk per round in arrival order; the round with its last chunk samples the
  first token, and the row drafts from the next round.
Paged mode: a `PageAllocator` reserves a request's pages for every position a round can
write when it takes its slot (a request that does not fit waits, first come first
served), and gives them back when it finishes or is cancelled.
"""

from __future__ import annotations

import collections

import numpy as np

from dspark_jax.engine.results import PendingRequest
from dspark_jax.errors import DSparkError
from dspark_jax.paged_cache import PageAllocator, PagedKVCache, pages_needed


class SlotTable:
    """Host-side facts per slot (numpy tables the device copies at admission) and the queue."""

    def __init__(self, slots: int, gamma: int, max_stop_ids: int, allocator: PageAllocator | None = None):
        self.slots, self.gamma = slots, gamma
        self.req: list[PendingRequest | None] = [None] * slots
        self.waiting: collections.deque[PendingRequest] = collections.deque()
        self.prefilling: list[int] = []            # slots whose prompt enters chunk by chunk, in arrival order
        self.prefill_at = np.zeros(slots, np.int64)  # prompt tokens already sent, for chunked prefill
        self.seen = np.zeros(slots, np.int64)        # tokens of the slot's request the host has read back
        self.temp = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.max_new = np.ones(slots, np.int32)
        self.max_depth = np.zeros(slots, np.int32)
        self.stops = np.full((slots, max_stop_ids), -1, np.int32)
        self.live = np.zeros(slots, bool)            # the rounds' `live` mask: the row is its request's
        self.allocator = allocator

    # ------------------------------------------------------------------ queries

    def free(self) -> list[int]:
        return [s for s, r in enumerate(self.req) if r is None]

    def decoding(self) -> list[int]:
        """Seated slots whose prompt is in the cache (the host's view: some may have
        finished on the device in a round not read back yet)."""
        return [s for s, r in enumerate(self.req) if r is not None and s not in self.prefilling]

    def occupied(self) -> bool:
        return any(r is not None for r in self.req)

    def all_greedy(self) -> bool:
        """Whether every seated request is greedy (rounds may then promise greedy rows)."""
        return all(self.temp[s] == 0 for s, r in enumerate(self.req) if r is not None)

    def limits(self, idx) -> np.ndarray:
        """Each slot's depth limit as far as the host knows: its own and the room left."""
        room = np.minimum(self.max_depth[idx], self.max_new[idx] - self.seen[idx] - 1)
        return np.maximum(np.minimum(room, self.gamma), 0)

    # ------------------------------------------------------------------ seating

    def take_waiting(self) -> list[tuple[int, PendingRequest]]:
        """Seat waiting requests in free slots, in arrival order; in paged mode each
        reserves its pages and the queue stops at the first that does not fit."""
        take = []
        for s in self.free():
            if not self.waiting:
                break
            req = self.waiting[0]
            if self.allocator is not None:
                rid, n = req.result.request_id, self.reserve_tokens(len(req.prompt), req.result.max_new_tokens)
                if not self.allocator.can_allocate(rid, n):
                    break
                self.allocator.allocate(rid, n)
            take.append((s, self.waiting.popleft()))
            self.seat(s, take[-1][1])
        return take

    def seat(self, s: int, req: PendingRequest) -> None:
        self.req[s] = req
        self.temp[s], self.top_k[s], self.top_p[s] = req.temperature, req.top_k, req.top_p
        self.max_new[s], self.max_depth[s], self.seen[s] = req.result.max_new_tokens, req.max_depth, 0
        self.stops[s] = -1
        self.stops[s, :len(req.stop_ids)] = req.stop_ids
        self.prefill_at[s] = 0
        self.live[s] = False  # until its prompt starts entering the cache: the row may hold a cancelled request

    def start(self, s: int) -> None:
        """Slot s's prompt enters the cache in the call being dispatched (a prefill pass or
        its first chunk): from then on the row is the new request's."""
        self.live[s] = True

    def unseat(self, s: int) -> PendingRequest:
        """Free slot s (finished or cancelled): its pages go back at once."""
        req, self.req[s] = self.req[s], None
        self.live[s] = False
        if s in self.prefilling:
            self.prefilling.remove(s)
        self.release(req)
        return req

    def remove_waiting(self, request_id: int) -> PendingRequest | None:
        for req in self.waiting:
            if req.result.request_id == request_id:
                self.waiting.remove(req)
                return req
        return None

    # ------------------------------------------------------------------ chunked prefill

    def next_chunk(self, width: int):
        """The next chunk of the first prompt being admitted -> (slot, tokens [C], next
        tokens [C], start, length, final) or None."""
        if not self.prefilling:
            return None
        s = self.prefilling[0]
        p, at = self.req[s].prompt, int(self.prefill_at[s])
        n = min(len(p) - at, width)
        if at == 0:
            self.start(s)
        tokens, nxt = np.zeros(width, np.int32), np.zeros(width, np.int32)
        tokens[:n] = p[at:at + n]
        follow = p[at + 1:at + n + 1]
        nxt[:len(follow)] = follow
        self.prefill_at[s] = at + n
        final = at + n == len(p)
        if final:
            self.prefilling.remove(s)
        return s, tokens, nxt, at, n, final

    # ------------------------------------------------------------------ pages

    def reserve_tokens(self, prompt_len: int, max_new: int) -> int:
        """Tokens reserved at admission: every cache position a round can write (the
        writes stop at prompt + max_new - 2; gamma + 1 more is a margin)."""
        return prompt_len + max_new + self.gamma + 1

    def release(self, req: PendingRequest) -> None:
        if self.allocator is not None and req.result.request_id in self.allocator:
            self.allocator.release(req.result.request_id)

    def page_table(self, pages_per_seq: int) -> np.ndarray:
        rids = [r.result.request_id if r is not None else None for r in self.req]
        return self.allocator.page_table(rids, pages_per_seq)


def paged_cache(tcfg, slots: int, positions: int, page_size: int, num_pages: int | None, impl: str,
                interpret: bool) -> tuple[PageAllocator, PagedKVCache]:
    """A paged target cache for `slots` rows of up to `positions` positions, and its page
    allocator (num_pages None: room for every slot at full length, plus the NULL page)."""
    from dspark_jax.models import registry

    family = registry.for_config(tcfg)
    if not family.paged:
        raise DSparkError(f"the paged engine does not support {family.name} targets yet (use paged=False)")
    if page_size < 1:
        raise DSparkError(f"page_size must be >= 1; got {page_size}")
    pages_per_seq = pages_needed(positions, page_size)
    if num_pages is None:
        num_pages = slots * pages_per_seq + 1
    cache = PagedKVCache.init(num_layers=tcfg.num_hidden_layers, num_pages=num_pages, page_size=page_size,
                              kv_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim, batch=slots,
                              pages_per_seq=pages_per_seq, dtype=tcfg.jnp_dtype, impl=impl, interpret=interpret)
    return PageAllocator(num_pages, page_size), cache
