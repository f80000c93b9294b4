"""Drafter block attention: reference vs the backbone's jnp path, kernels vs reference.

As in test_kernels_verify: the TPU class, re-run for the GPU variant by subclassing; a
variant not matching the backend runs in interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.attention import attend
from dspark_jax.drafters.backbone import block_mask
from pallas_kernels._common import gather_pages
from pallas_kernels.block_attention import block_attention, block_attention_reference
from pallas_kernels.testing import random_paged_kv

PAGE, PPS, POOL, D = 8, 6, 40, 32

# (name, G, ctx_lens, Hkv, group, softcap, block sizes)
CASES = [
    ("dspark_g8_mha", 8, [37, 0, 48], 2, 1, None, {}),
    ("g8_gqa4_softcap", 8, [40, 9, 16], 2, 4, 4.0, dict(pages_per_block=2)),
    ("dflash_g16_gqa8_splits", 16, [3, 47, 24], 1, 8, None, dict(pages_per_block=2, num_splits=3)),
]


def _inputs(seed, g, ctx_lens, hkv, group, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    k, v, table = random_paged_kv(rng, ctx_lens, pages_per_seq=PPS, page_size=PAGE, num_pages=POOL,
                                  kv_heads=hkv, head_dim=D, dtype=dtype)
    b = len(ctx_lens)
    q = jnp.asarray(rng.standard_normal((b, g, hkv * group, D)), dtype)
    kb = jnp.asarray(rng.standard_normal((b, g, hkv, D)), dtype)
    vb = jnp.asarray(rng.standard_normal((b, g, hkv, D)), dtype)
    return q, k, v, jnp.asarray(ctx_lens, jnp.int32), table, kb, vb


def test_reference_matches_backbone_attend():
    """Same as the drafter layer: attend over [ctx ; block] under backbone.block_mask."""
    q, k_pages, v_pages, ctx_lens, table, kb, vb = _inputs(0, 8, [37, 0, 20], 2, 4)
    out = block_attention_reference(q, k_pages, v_pages, ctx_lens, table, kb, vb, sm_scale=0.25)
    k_ctx, v_ctx = gather_pages(k_pages, table), gather_pages(v_pages, table)
    ctx_valid = jnp.arange(k_ctx.shape[1])[None, :] < ctx_lens[:, None]
    want = attend(q, jnp.concatenate([k_ctx, kb], 1), jnp.concatenate([v_ctx, vb], 1),
                  block_mask(ctx_valid, 8), scale=0.25)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)


def test_auto_on_cpu_is_reference():
    args = _inputs(1, 4, [5, 30], 2, 2)
    got, want = block_attention(*args, sm_scale=0.5), block_attention_reference(*args, sm_scale=0.5)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, want)
    else:  # auto picked this backend's kernel
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k_blk"):
        block_attention(*args[:5], args[5][:, :2], args[6], sm_scale=0.5)


class TestBlockKernelTPU:
    IMPL = "tpu"

    @property
    def interpret(self):
        return jax.default_backend() != self.IMPL

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_reference(self, case):
        _, g, ctx_lens, hkv, group, softcap, blocks = case
        args = _inputs(sum(map(ord, case[0])), g, ctx_lens, hkv, group)
        want = block_attention_reference(*args, sm_scale=D ** -0.5, softcap=softcap)
        got = block_attention(*args, sm_scale=D ** -0.5, softcap=softcap, impl=self.IMPL,
                              interpret=self.interpret, **blocks)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert not np.isnan(np.asarray(got)).any(), "NaN from an unused context slot leaked"
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def test_bfloat16(self):
        args = _inputs(5, 8, [45, 12], 2, 4, dtype=jnp.bfloat16)
        want = block_attention_reference(*args, sm_scale=D ** -0.5)
        got = block_attention(*args, sm_scale=D ** -0.5, impl=self.IMPL, interpret=self.interpret,
                              pages_per_block=2)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


class TestBlockKernelGPU(TestBlockKernelTPU):
    IMPL = "gpu"


# Pallas -> Triton IR / Mosaic MLIR lowering on this host (no device compiler, no timing).
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", [(2, 1, 32, 8, 128, 16, 8, jnp.bfloat16, 4, None),
                                   (3, 16, 16, 2, 64, 8, 5, jnp.float32, 2, 20.0)],
                         ids=["g1_bf16", "g16_f32_softcap"])
def test_kernel_lowers_for_hardware(platform, shape):
    from pallas_kernels.block_attention import _block_gpu, _block_tpu
    from pallas_kernels.testing import lower_for_platform
    b, g, hq, hkv, d, page, pps, dt, ppb, softcap = shape
    S = jax.ShapeDtypeStruct
    pool = S((hkv, b * pps + 1, page, d), dt)
    args = (S((b, g, hq, d), dt), pool, pool, S((b,), jnp.int32), S((b, pps), jnp.int32),
            S((b, g, hkv, d), dt), S((b, g, hkv, d), dt))
    common = dict(sm_scale=0.1, softcap=softcap, pages_per_block=ppb, interpret=False)
    if platform == "cuda":
        fn = functools.partial(_block_gpu, num_splits=None, num_warps=4, num_stages=2, **common)
    else:
        fn = functools.partial(_block_tpu, **common)
    try:
        text = lower_for_platform(fn, platform, *args)
    except RuntimeError as e:
        pytest.skip(str(e))
    assert "triton" in text or "tpu_custom_call" in text
