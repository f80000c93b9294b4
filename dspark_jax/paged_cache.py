"""Paged KV cache for the serving engine: a host-side page allocator + device-side pure functions.

The pool holds `num_pages` pages of `page_size` token slots per layer and KV head; a
request owns a list of pages, and its page table row maps logical page i (positions
i*page_size .. (i+1)*page_size - 1) to a physical page. Requests grow page by page and
give all pages back when they finish, so memory follows the live tokens instead of
batch x max_len.

Interface (what the engine wires together):

    alloc = PageAllocator(num_pages=1024, page_size=16)     # host, plain Python
    alloc.allocate(rid, num_tokens)      # grow rid's pages to hold num_tokens tokens in total
    alloc.release(rid)                   # give rid's pages back
    table = alloc.page_table([rid0, None, rid2], pages_per_seq)   # np.int32 [B, pages_per_seq]

    cache = PagedKVCache.init(num_layers=L, num_pages=1024, page_size=16, kv_heads=Hkv,
                              head_dim=D, batch=B, pages_per_seq=N, dtype=jnp.bfloat16)
    cache = cache.replace(page_table=jnp.asarray(table))   # after admissions / growth
    # per layer, inside the jitted step (positions = lengths[:, None] + arange(T)):
    cache = write(cache, layer, k_new, v_new, positions, valid)      # [B, T, Hkv, D]
    out = verify_attention(q, cache.k_pages[layer], cache.v_pages[layer],
                           cache.lengths + q_lens, q_lens, cache.page_table, sm_scale=...)
    k, v = gather(cache, layer)          # contiguous [B, pages_per_seq * page_size, Hkv, D]
    # after all layers:
    cache = advance(cache, q_lens)       # lengths += q_lens (the committed tokens)

Before a step that writes T tokens for request b, the host must `allocate(rid, lengths[b]
+ T)` and refresh the page table; afterwards (speculative rejection) the length simply
rolls back, the pages stay owned and the stale slots are overwritten later.

Page 0 is reserved as the NULL page: it is never handed out, page tables are padded with
it, and a write whose page was not allocated lands there (harmless) instead of in another
request's page. So `capacity == num_pages - 1`. Slots at positions >= lengths[b] are
garbage by contract (every reader masks them, and the kernels are NaN-safe).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dspark_jax.errors import DSparkError

NULL_PAGE = 0


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-int(num_tokens) // int(page_size))


class PageAllocator:
    """Free list of physical pages; each request owns an ordered list of pages."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise DSparkError(f"paged cache needs num_pages >= 2 (page 0 is reserved) and page_size >= 1; "
                              f"got num_pages={num_pages}, page_size={page_size}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        # Stack with the lowest ids on top, so a fresh allocator hands out 1, 2, 3, ...
        self._free: list[int] = list(range(self.num_pages - 1, NULL_PAGE, -1))
        self._owned: dict[Hashable, list[int]] = {}

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def __contains__(self, request_id) -> bool:
        return request_id in self._owned

    def pages(self, request_id) -> tuple[int, ...]:
        """Physical pages of `request_id`, in logical order (empty if unknown)."""
        return tuple(self._owned.get(request_id, ()))

    def can_allocate(self, request_id, num_tokens: int) -> bool:
        need = pages_needed(num_tokens, self.page_size) - len(self._owned.get(request_id, ()))
        return need <= self.num_free

    def allocate(self, request_id, num_tokens: int) -> tuple[int, ...]:
        """Grow `request_id`'s pages to hold `num_tokens` tokens in total (never shrinks).

        Admits the request if it is new. All or nothing: when the pool is short, nothing
        changes and a one-line DSparkError says how many pages were missing.
        """
        if num_tokens < 0:
            raise DSparkError(f"cannot allocate {num_tokens} tokens for request {request_id!r}")
        owned = self._owned.get(request_id, [])
        need = pages_needed(num_tokens, self.page_size) - len(owned)
        if need > len(self._free):
            raise DSparkError(
                f"out of KV cache pages: request {request_id!r} needs {need} more page(s) of "
                f"{self.page_size} tokens but only {len(self._free)} of {self.capacity} are free "
                f"(release finished requests, lower the batch, or enlarge the page pool)")
        for _ in range(max(need, 0)):
            owned.append(self._free.pop())
        self._owned[request_id] = owned
        return tuple(owned)

    def release(self, request_id) -> int:
        """Give back every page of `request_id`; returns how many. Unknown ids raise."""
        if request_id not in self._owned:
            raise DSparkError(f"release of unknown request {request_id!r} (never allocated or already released)")
        pages = self._owned.pop(request_id)
        self._free.extend(reversed(pages))
        return len(pages)

    def page_table(self, slots: Sequence, pages_per_seq: int | None = None) -> np.ndarray:
        """int32 [len(slots), pages_per_seq]: row b lists slots[b]'s pages, padded with NULL_PAGE.

        A slot may be None (an empty batch row: all NULL_PAGE). `pages_per_seq` defaults to
        the longest row; a request with more pages than that raises.
        """
        rows = [self._owned.get(s, []) if s is not None else [] for s in slots]
        for s in slots:
            if s is not None and s not in self._owned:
                raise DSparkError(f"page table for unknown request {s!r}")
        if pages_per_seq is None:
            pages_per_seq = max([1] + [len(r) for r in rows])
        table = np.full((len(rows), int(pages_per_seq)), NULL_PAGE, np.int32)
        for b, (s, r) in enumerate(zip(slots, rows)):
            if len(r) > table.shape[1]:
                raise DSparkError(f"request {s!r} holds {len(r)} pages but the page table has room for "
                                  f"{table.shape[1]} (raise pages_per_seq / the maximum length)")
            table[b, :len(r)] = r
        return table

    def check(self) -> None:
        """Assert the invariants: each page is free xor owned once; page 0 never circulates."""
        owned = [p for pages in self._owned.values() for p in pages]
        every = owned + self._free
        if len(every) != len(set(every)):
            raise AssertionError("a page is owned twice or both owned and free")
        if sorted(every) != list(range(1, self.num_pages)):
            raise AssertionError("pages leaked or the NULL page is in circulation")


@struct.dataclass
class PagedKVCache:
    k_pages: jax.Array     # [L, Hkv, P, page, D]
    v_pages: jax.Array     # [L, Hkv, P, page, D]
    lengths: jax.Array     # [B] int32 committed tokens per batch row
    page_table: jax.Array  # [B, pages_per_seq] int32 physical page of each logical page
    # Static (hashable, part of the treedef): how the model attends over the pages, i.e.
    # pallas_kernels.verify_attention's `impl` ("auto": the kernel of the default backend,
    # the jnp reference on CPU) and `interpret` (run a kernel in the Pallas interpreter).
    impl: str = struct.field(pytree_node=False, default="auto")
    interpret: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, *, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
             batch: int, pages_per_seq: int, dtype=jnp.float32, impl: str = "auto",
             interpret: bool = False) -> "PagedKVCache":
        shape = (num_layers, kv_heads, num_pages, page_size, head_dim)
        return cls(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32),
                   page_table=jnp.full((batch, pages_per_seq), NULL_PAGE, jnp.int32),
                   impl=str(impl), interpret=bool(interpret))

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_len(self) -> int:
        return self.pages_per_seq * self.page_size

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


# Logical axes (dspark_jax/mesh.py): the pool is shared by all rows, so only KV heads shard.
PAGED_KV_CACHE_AXES = PagedKVCache(k_pages=("layers", "kv_heads", None, None, "head_dim"),
                                   v_pages=("layers", "kv_heads", None, None, "head_dim"),
                                   lengths=("batch",), page_table=("batch", None))


def slot_index(page_table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int,
               num_pages: int) -> tuple[jax.Array, jax.Array]:
    """(physical page, offset) [B, T] of each token; invalid or out-of-table tokens get page
    `num_pages` (out of range, so a scatter with mode="drop" skips them)."""
    logical = positions // page_size
    inside = valid & (positions >= 0) & (logical < page_table.shape[1])
    page = jnp.take_along_axis(page_table, jnp.clip(logical, 0, page_table.shape[1] - 1), axis=1)
    return jnp.where(inside, page, num_pages), positions % page_size


def write(cache: PagedKVCache, layer, new_k: jax.Array, new_v: jax.Array, positions: jax.Array,
          valid: jax.Array) -> PagedKVCache:
    """Scatter new_k/new_v [B, T, Hkv, D] into `layer`'s pages at `positions` [B, T]; slots
    with valid [B, T] False are dropped. `lengths` is not changed (see `advance`)."""
    page, off = slot_index(cache.page_table, positions, valid, cache.page_size, cache.num_pages)
    heads = jnp.arange(new_k.shape[2])[None, None, :]
    page, off = page[:, :, None], off[:, :, None]  # [B, T, 1] against heads [1, 1, Hkv]
    k = cache.k_pages.at[layer, heads, page, off].set(new_k.astype(cache.k_pages.dtype), mode="drop")
    v = cache.v_pages.at[layer, heads, page, off].set(new_v.astype(cache.v_pages.dtype), mode="drop")
    return cache.replace(k_pages=k, v_pages=v)


def gather(cache: PagedKVCache, layer) -> tuple[jax.Array, jax.Array]:
    """Contiguous views (k, v), each [B, pages_per_seq * page_size, Hkv, D], for the jnp path."""
    def one(pages):
        x = pages[layer][:, cache.page_table]  # [Hkv, B, pages_per_seq, page, D]
        hkv, b, n, p, d = x.shape
        return x.transpose(1, 2, 3, 0, 4).reshape(b, n * p, hkv, d)
    return one(cache.k_pages), one(cache.v_pages)


def advance(cache: PagedKVCache, q_lens: jax.Array) -> PagedKVCache:
    """Commit q_lens [B] new tokens per row (call once per step, after every layer wrote)."""
    return cache.replace(lengths=cache.lengths + q_lens.astype(jnp.int32))


def reset_rows(cache: PagedKVCache, rows: jax.Array) -> PagedKVCache:
    """Mark the rows selected by the bool mask `rows` [B] as empty (length 0)."""
    return cache.replace(lengths=jnp.where(rows, 0, cache.lengths))
