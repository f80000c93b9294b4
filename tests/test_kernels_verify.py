"""Paged verification attention: reference vs dspark_jax.attention, kernels vs reference.

The kernel test class runs the TPU variant; its subclass re-runs everything with the GPU
variant. A variant that does not match the machine's backend runs in interpret mode (so on
CPU both are interpreted; on a GPU host the GPU class compiles the real Triton kernel).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.attention import attend, causal_mask
from pallas_kernels._common import gather_pages
from pallas_kernels.testing import random_paged_kv
from pallas_kernels.verify_attention import verify_attention, verify_attention_reference

PAGE, PPS, POOL, D = 8, 6, 40, 32
GAMMA = 7

# (name, T, q_lens, kv_lens, Hkv, group, window, softcap, block sizes)
CASES = [
    ("decode_mha_ragged", 1, [1, 0, 1], [37, 1, 48], 2, 1, None, None, {}),
    ("verify_gqa4_window", 1 + GAMMA, [8, 1, 5], [40, 9, 30], 2, 4, 6, None, dict(pages_per_block=2)),
    ("verify_gqa8_softcap", 1 + GAMMA, [8, 8, 3], [8, 47, 21], 1, 8, None, 5.0, dict(pages_per_block=2, num_splits=3)),
    ("decode_gqa4_window_softcap", 1, [1, 1, 0], [16, 33, 5], 2, 4, 9, 3.0, {}),
]


def _inputs(seed, t, q_lens, kv_lens, hkv, group, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    k, v, table = random_paged_kv(rng, kv_lens, pages_per_seq=PPS, page_size=PAGE, num_pages=POOL,
                                  kv_heads=hkv, head_dim=D, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((len(kv_lens), t, hkv * group, D)), dtype)
    return q, k, v, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(q_lens, jnp.int32), table


def test_reference_matches_attend():
    """The reference is dspark_jax.attention.attend on the gathered cache and causal_mask."""
    q, k_pages, v_pages, kv_lens, q_lens, table = _inputs(0, 8, [8, 1, 5], [40, 9, 30], 2, 4)
    for window, softcap in [(None, None), (6, 5.0)]:
        out = verify_attention_reference(q, k_pages, v_pages, kv_lens, q_lens, table, sm_scale=0.3,
                                         window=window, softcap=softcap)
        k, v = gather_pages(k_pages, table), gather_pages(v_pages, table)
        steps = jnp.arange(8)
        q_pos = (kv_lens - q_lens)[:, None] + steps
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), (3, k.shape[1]))
        mask = causal_mask(q_pos, steps < q_lens[:, None], k_pos, k_pos < kv_lens[:, None], window)
        want = attend(q, k, v, mask, scale=0.3, softcap=softcap)
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
        assert not np.asarray(out[1, 1:]).any() and not np.asarray(out[2, 5:]).any()  # rows t >= q_len


def test_auto_on_cpu_is_reference():
    q, k, v, kv_lens, q_lens, table = _inputs(1, 2, [2, 1], [10, 20], 2, 2)
    args = (q, k, v, kv_lens, q_lens, table)
    got, want = verify_attention(*args, sm_scale=0.5), verify_attention_reference(*args, sm_scale=0.5)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, want)
    else:  # auto picked this backend's kernel
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret"):
            verify_attention(*args, sm_scale=0.5, impl="gpu")
    with pytest.raises(ValueError, match="impl"):
        verify_attention(*args, sm_scale=0.5, impl="cuda")


class TestVerifyKernelTPU:
    IMPL = "tpu"

    @property
    def interpret(self):
        return jax.default_backend() != self.IMPL

    def run(self, args, **kw):
        return verify_attention(*args, impl=self.IMPL, interpret=self.interpret, **kw)

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_matches_reference(self, case):
        _, t, q_lens, kv_lens, hkv, group, window, softcap, blocks = case
        args = _inputs(sum(map(ord, case[0])), t, q_lens, kv_lens, hkv, group)
        want = verify_attention_reference(*args, sm_scale=D ** -0.5, window=window, softcap=softcap)
        got = self.run(args, sm_scale=D ** -0.5, window=window, softcap=softcap, **blocks)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert not np.isnan(np.asarray(got)).any(), "NaN from an unused cache slot leaked"
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def test_bfloat16(self):
        args = _inputs(7, 1 + GAMMA, [8, 4, 1], [45, 12, 3], 2, 4, dtype=jnp.bfloat16)
        want = verify_attention_reference(*args, sm_scale=D ** -0.5)
        got = self.run(args, sm_scale=D ** -0.5, pages_per_block=2)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


class TestVerifyKernelGPU(TestVerifyKernelTPU):
    IMPL = "gpu"


@pytest.mark.slow
def test_tpu_kernel_race_detector():
    """The TPU kernel under the interpreter's race detector and NaN-poisoned VMEM."""
    from jax.experimental.pallas import tpu as pltpu
    args = _inputs(3, 1 + GAMMA, [8, 2], [30, 41], 2, 4)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    got = verify_attention(*args, sm_scale=0.2, window=12, impl="tpu", interpret=params, pages_per_block=2)
    got.block_until_ready()
    try:  # private module: the flag lives here in jax 0.10; skip the check if it moved
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
        assert not (ipc.races is not None and ipc.races.races_found), "race detected"
    except ImportError:
        pass
    np.testing.assert_allclose(got, verify_attention_reference(*args, sm_scale=0.2, window=12), atol=1e-5, rtol=1e-5)


# Hardware lowering without hardware: Pallas -> Triton IR / Mosaic MLIR in Python (the
# device compilers themselves, and all timing, still need a GPU / TPU).
LOWERING = [  # (B, T, Hq, Hkv, D, page, pages_per_seq, dtype, pages_per_block, window, softcap)
    (2, 1, 32, 8, 128, 16, 8, jnp.bfloat16, 4, None, None),
    (3, 1 + GAMMA, 16, 2, 64, 8, 5, jnp.float32, 2, 16, 30.0),
]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", LOWERING, ids=["decode_bf16", "verify_f32_window_softcap"])
def test_kernel_lowers_for_hardware(platform, shape):
    from pallas_kernels.verify_attention import _verify_gpu, _verify_tpu
    from pallas_kernels.testing import lower_for_platform
    b, t, hq, hkv, d, page, pps, dt, ppb, window, softcap = shape
    S = jax.ShapeDtypeStruct
    args = (S((b, t, hq, d), dt), S((hkv, b * pps + 1, page, d), dt), S((hkv, b * pps + 1, page, d), dt),
            S((b,), jnp.int32), S((b,), jnp.int32), S((b, pps), jnp.int32))
    common = dict(sm_scale=0.1, window=window, softcap=softcap, pages_per_block=ppb, interpret=False)
    if platform == "cuda":
        fn = functools.partial(_verify_gpu, num_splits=None, num_warps=4, num_stages=2, **common)
    else:
        fn = functools.partial(_verify_tpu, **common)
    try:
        text = lower_for_platform(fn, platform, *args)
    except RuntimeError as e:
        pytest.skip(str(e))
    assert "triton" in text or "tpu_custom_call" in text


def test_bench_cli_smoke(capsys):
    """serve.bench_kernels end to end on tiny shapes (reference only: fast on CPU)."""
    import json

    from serve import bench_kernels
    bench_kernels.main(["--batch", "2", "--context", "40", "--q-len", "1,8", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "32", "--page-size", "8", "--impl", "reference", "--repeats", "1",
                        "--warmup", "1", "--hbm-gib", "0.01", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["q_len"] for r in rows] == [1, 8]
    assert all(r["time_ms"] > 0 and r["kv_gb_per_s"] > 0 for r in rows)
    assert rows[1]["vs_decode"] > 0 and rows[0]["hbm_gb_per_s"] > 0
