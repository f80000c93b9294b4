"""Random paged pools for tests: scattered pages, partly filled, NaN wherever nothing was written."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def random_paged_kv(rng: np.random.Generator, lens, *, pages_per_seq: int, page_size: int, num_pages: int,
                    kv_heads: int, head_dim: int, dtype=jnp.float32, unused=np.nan):
    """-> (k_pages, v_pages [Hkv, P, page, D], page_table [B, pages_per_seq] int32).

    Row b owns ceil(lens[b] / page_size) pages drawn at random from 1..P-1 (page 0 stays
    unowned, as in dspark_jax.paged_cache); its table is padded with random other ids
    (readers must mask them). Every slot at or past a row's length, and every unowned
    page, holds `unused` (NaN by default) so a reader that fails to mask it shows up.
    """
    lens = np.asarray(lens)
    need = [-(-int(n) // page_size) for n in lens]
    if max(need) > pages_per_seq or sum(need) > num_pages - 1:
        raise ValueError(f"pool too small: lengths {lens.tolist()} need {need} pages, have "
                         f"{num_pages - 1} ({pages_per_seq} per sequence)")
    shape = (kv_heads, num_pages, page_size, head_dim)
    k = np.full(shape, unused, np.float32)
    v = np.full(shape, unused, np.float32)
    ids = rng.permutation(np.arange(1, num_pages))
    table = rng.integers(0, num_pages, size=(len(lens), pages_per_seq)).astype(np.int32)
    used = 0
    for b, n in enumerate(lens):
        own = ids[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = own
        for i, page in enumerate(own):
            filled = min(page_size, int(n) - i * page_size)
            k[:, page, :filled] = rng.standard_normal((kv_heads, filled, head_dim))
            v[:, page, :filled] = rng.standard_normal((kv_heads, filled, head_dim))
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table)


def lower_for_platform(fn, platform: str, *args) -> str:
    """Lower `fn(*args)` (ShapeDtypeStructs are fine) for "cuda" or "tpu" on any host; returns MLIR text.

    Runs the Pallas -> Triton / Mosaic lowering in Python (shape rules, supported
    primitives, power-of-two loads) without the device compiler. For "tpu" on a host
    without a TPU, Mosaic needs chip info: it is taken from a TPU v5e through a private
    jax registry, so this raises RuntimeError where that hook is gone (callers skip).
    """
    import jax
    from jax import export

    if platform == "tpu" and jax.default_backend() != "tpu":
        try:
            from jax._src.pallas.mosaic import tpu_info
            kind = jax.devices()[0].device_kind
            tpu_info.registry.setdefault(kind, lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"cannot fake TPU chip info on this jax: {e}") from None
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()
