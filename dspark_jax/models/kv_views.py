"""Attention views: where one forward call writes K/V and which keys each query sees.

A target model has one layer loop for every call; what differs from call to call is
gathered in a `View`, built once per call by `dense` ([B, T] tokens) or `packed`
(ragged tokens of different cache rows). A view composes two plain parts:

- query layouts, one per slice of the call's queries [Q, T, H, D]: `Rows` (dense rows,
  row b reads cache row b), `Tokens` (one token per query row, reading its own cache
  row), `Grid` (tokens scattered onto a [rows, W] grid that reads each row once) and
  `Lines` (dense tail lines of prompt chunk). A layout regroups its queries for the
  attention (`group`), says which cache row each group reads (`key_rows`: None means
  group g reads row g), where its queries sit (`q_pos`, `q_ok`) and puts the output
  back in query order (`ungroup`);
- a cache access: `Fresh` (no cache: the new K/V are the keys), `Slots` (a slot cache:
  one full-length row per request, attention masked in jnp) or `Pages` (a paged cache,
  attention by `pallas_kernels.verify_attention`). It writes a layer's new K/V and
  attends a layout's grouped queries to the keys.

`view.write(layer, k, v)` stores K/V and returns the keys (a KV-shared layer may reuse
them); `view.read(q, keys, window)` attends, a sliding window restricting every query to
keys at positions > its own - window; `view(layer, q, k, v)` is both. `view.cache` is
the cache as the writes left it (lengths unchanged: the caller commits).

A cache with several K/V fields (Gemma 4 keeps sliding and full layers apart) names
them with `fields(layer) -> (k field, v field, index in those fields)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dspark_jax import paged_cache
from dspark_jax.attention import attend, causal_mask
from dspark_jax.kv_cache import write_index
from dspark_jax.paged_cache import PagedKVCache

Fields = Callable[[int], tuple[str, str, int]]


def layer_fields(layer: int) -> tuple[str, str, int]:
    """A single-group cache (KVCache): layer i's K/V are k[i], v[i]."""
    return "k", "v", layer


# ------------------------------------------------------------------ query layouts

@dataclasses.dataclass(frozen=True)
class Rows:
    """Dense rows: queries [B, T] at positions pos [B, T] (ok: real, not padding), row b
    reading cache row b; q_lens [B] real tokens per row."""

    q_pos: jax.Array
    q_ok: jax.Array
    q_lens: jax.Array
    key_rows = None

    def group(self, q):
        return q

    def ungroup(self, o):
        return o

    def paged_lens(self, lengths):
        """(kv_lens, q_lens) for verify_attention: the row's queries end its keys."""
        return lengths + self.q_lens, self.q_lens


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One token per query row ([N, 1]): token n at position pos[n] of cache row rows[n]
    reads that row's keys, gathered per token ([N, S] reads)."""

    rows: jax.Array
    pos: jax.Array
    ok: jax.Array

    @property
    def key_rows(self):
        return self.rows

    @property
    def q_pos(self):
        return self.pos[:, None]

    @property
    def q_ok(self):
        return self.ok[:, None]

    def group(self, q):
        return q

    def ungroup(self, o):
        return o

    def paged_lens(self, lengths):
        return jnp.where(self.ok, self.pos + 1, 0), self.ok.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Tokens ([N, 1]) scattered onto a dense [B, W] grid: token n goes to row rows[n],
    column positions[n] - lengths[rows[n]] (< W); each cache row is read once.
    Invalid tokens scatter nowhere and read back garbage."""

    rows: jax.Array
    scatter_rows: jax.Array   # rows, or B (dropped) for invalid tokens
    cols: jax.Array
    gather_cols: jax.Array    # cols clipped into the grid
    q_pos: jax.Array          # [B, W]
    q_ok: jax.Array           # [B, W]
    q_lens: jax.Array         # [B]: tokens on each grid row
    key_rows = None

    @classmethod
    def build(cls, rows, positions, valid, lengths, width: int) -> "Grid":
        b = lengths.shape[0]
        cols = positions - lengths[rows]
        scatter_rows = jnp.where(valid, rows, b)
        q_pos = jnp.zeros((b, width), jnp.int32).at[scatter_rows, cols].set(positions, mode="drop")
        q_ok = jnp.zeros((b, width), bool).at[scatter_rows, cols].set(True, mode="drop")
        q_lens = jnp.zeros((b,), jnp.int32).at[scatter_rows].add(1, mode="drop")
        return cls(rows, scatter_rows, cols, jnp.clip(cols, 0, width - 1), q_pos, q_ok, q_lens)

    def group(self, q):
        grid = jnp.zeros(self.q_pos.shape + q.shape[2:], q.dtype)
        return grid.at[self.scatter_rows, self.cols].set(q[:, 0], mode="drop")

    def ungroup(self, o):
        return o[self.rows, self.gather_cols][:, None]

    def paged_lens(self, lengths):
        return lengths + self.q_lens, self.q_lens


@dataclasses.dataclass(frozen=True)
class Lines:
    """`lines` dense lines of `width` tokens ([lines * width, 1] queries), line l all in
    cache row rows[l * width], attending on their own [lines, width] grid."""

    rows: jax.Array
    pos: jax.Array
    ok: jax.Array
    lines: int
    width: int

    @property
    def key_rows(self):
        return self.rows[::self.width]

    @property
    def q_pos(self):
        return self.pos.reshape(self.lines, self.width)

    @property
    def q_ok(self):
        return self.ok.reshape(self.lines, self.width)

    def group(self, q):
        return q[:, 0].reshape((self.lines, self.width) + q.shape[2:])

    def ungroup(self, o):
        return o.reshape((self.lines * self.width, 1) + o.shape[2:])

    def paged_lens(self, lengths):
        raise ValueError("a paged cache takes no tail lines (chunked prefill needs the slot cache)")


# ------------------------------------------------------------------ cache accesses

@dataclasses.dataclass(frozen=True)
class Fresh:
    """No cache: a layer's new K/V are its keys; a query sees the valid keys of its own
    row at positions <= its own."""

    scale: float

    def write(self, cache, layer, k, v):
        return cache, (k, v)

    def mask(self, layout, window):
        return causal_mask(layout.q_pos, layout.q_ok, layout.q_pos, layout.q_ok, window=window)

    def attend(self, cache, layout, q, keys, mask, window):
        return attend(q, *keys, mask, scale=self.scale)


@dataclasses.dataclass(frozen=True)
class Slots:
    """A slot cache: position p of request row r is slot p of row r. New K/V [G, T] go to
    rows [G, 1] at slots index [G, T] (out of range: dropped); a query sees its key
    rows' slots s <= its position."""

    fields: Fields
    rows: jax.Array
    index: jax.Array
    max_len: int
    scale: float

    def write(self, cache, layer, k, v):
        kn, vn, slot = self.fields(layer)
        ck, cv = getattr(cache, kn), getattr(cache, vn)
        ck = ck.at[slot, self.rows, self.index].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[slot, self.rows, self.index].set(v.astype(cv.dtype), mode="drop")
        return cache.replace(**{kn: ck, vn: cv}), (ck[slot], cv[slot])

    def mask(self, layout, window):
        g = layout.q_pos.shape[0]
        slots = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (g, self.max_len))
        return causal_mask(layout.q_pos, layout.q_ok, slots, jnp.ones((g, self.max_len), bool), window=window)

    def attend(self, cache, layout, q, keys, mask, window):
        k, v = keys
        if layout.key_rows is not None:
            k, v = k[layout.key_rows], v[layout.key_rows]
        return attend(q, k, v, mask, scale=self.scale)


@dataclasses.dataclass(frozen=True)
class Pages:
    """A paged cache (PagedKVCache, one group: layer i's pages are k_pages[i], v_pages[i]):
    new K/V [G, T] at positions [G, T] (ok False: dropped) go to the pages of page-table
    rows `table` [G, pages]; attention is verify_attention over the key rows' pages with
    the cache's static impl / interpret."""

    table: jax.Array
    pos: jax.Array
    ok: jax.Array
    scale: float

    def write(self, cache, layer, k, v):
        full = cache.page_table
        cache = paged_cache.write(cache.replace(page_table=self.table), layer, k, v, self.pos, self.ok)
        cache = cache.replace(page_table=full)
        return cache, (cache.k_pages[layer], cache.v_pages[layer])

    def mask(self, layout, window):
        return None

    def attend(self, cache, layout, q, keys, mask, window):
        from pallas_kernels import verify_attention

        kv_lens, q_lens = layout.paged_lens(cache.lengths)
        table = cache.page_table if layout.key_rows is None else cache.page_table[layout.key_rows]
        return verify_attention(q, *keys, kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), table,
                                sm_scale=self.scale, window=window, impl=cache.impl, interpret=cache.interpret)


# ------------------------------------------------------------------ the view

class View:
    """One call's attention: `access` writes and reads `cache`; `segments` are (start,
    stop, layout) slices of the queries; `positions` [Q, T] feed RoPE."""

    def __init__(self, cache, access, segments, positions):
        self.cache, self.access, self.segments, self.positions = cache, access, segments, positions
        self._masks: dict[tuple[int, Any], Any] = {}  # (segment, window) -> mask, built once per call

    def write(self, layer: int, k, v):
        """Store layer's new K/V [Q, T, Hkv, D]; returns the keys its queries read."""
        self.cache, keys = self.access.write(self.cache, layer, k, v)
        return keys

    def read(self, q, keys, window: int | None = None):
        """Attend q [Q, T, Hq, D] to `keys` (from `write`) -> [Q, T, Hq, D]."""
        outs = []
        for n, (start, stop, layout) in enumerate(self.segments):
            if (n, window) not in self._masks:
                self._masks[n, window] = self.access.mask(layout, window)
            part = q if len(self.segments) == 1 else q[start:stop]
            o = self.access.attend(self.cache, layout, layout.group(part), keys, self._masks[n, window], window)
            outs.append(layout.ungroup(o))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)

    def __call__(self, layer: int, q, k, v, window: int | None = None):
        return self.read(q, self.write(layer, k, v), window)


def _access(cache, rows, positions, valid, scale: float, fields: Fields):
    """The cache access for `cache` (None, a slot cache, a PagedKVCache): query row g
    writes into cache row rows[g] (rows None: row g) at positions [G, T] where valid."""
    if cache is None:
        return Fresh(scale)
    if isinstance(cache, PagedKVCache):
        table = cache.page_table if rows is None else cache.page_table[rows]
        return Pages(table, positions, valid, scale)
    write_rows = jnp.arange(positions.shape[0])[:, None] if rows is None else rows[:, None]
    return Slots(fields, write_rows, write_index(positions, valid, cache.max_len), cache.max_len, scale)


def dense(cache, q_lens, width: int, *, scale: float, fields: Fields = layer_fields) -> View:
    """The view of a dense call: q_lens [B] real tokens of `width` per row, at positions
    lengths[b] + 0.. (0.. without a cache)."""
    b = q_lens.shape[0]
    steps = jnp.arange(width, dtype=jnp.int32)
    valid = steps[None, :] < q_lens[:, None]
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
    positions = start[:, None] + steps[None, :]
    layout = Rows(positions, valid, q_lens)
    return View(cache, _access(cache, None, positions, valid, scale, fields), [(0, b, layout)], positions)


def packed(cache, rows, positions, valid, query_block: int | None, tail: tuple[int, int] | None, *,
           scale: float, fields: Fields = layer_fields) -> View:
    """The view of a packed call (see Qwen3LM.packed): the leading tokens as `Tokens`
    (query_block None) or on a `Grid` of width query_block, then `tail` (R, C) lines."""
    n = rows.shape[0]
    head = n - (tail[0] * tail[1] if tail else 0)
    if query_block is None:
        first = Tokens(rows[:head], positions[:head], valid[:head])
    else:
        first = Grid.build(rows[:head], positions[:head], valid[:head], cache.lengths, query_block)
    segments = [(0, head, first)]
    if tail:
        segments.append((head, n, Lines(rows[head:], positions[head:], valid[head:], *tail)))
    access = _access(cache, rows, positions[:, None], valid[:, None], scale, fields)
    return View(cache, access, segments, positions[:, None])
