"""Backend profiling: the profile schema, roofline arithmetic, the report, and a --quick
CPU profile of the tiny fixture pair end to end."""

from __future__ import annotations

import json
import os
import time

import pytest

from dspark_jax import config as qcfg
from dspark_jax.errors import DSparkError
from serve.profiling import pairs, schema
from serve.profiling import roofline as rl
from serve.profiling.report import PLOTS, render, speedup_rows
from serve.profiling.settings import resolve_settings

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "fixtures", "profiles")
FAKE = [os.path.join(PROFILES, f) for f in ("fake_gpu_qwen3_4b.json", "fake_tpu_qwen3_4b.json")]
TINY = os.path.join(HERE, "fixtures", "qwen3_tiny_untied")


# ----------------------------------------------------------------------------- schema

def _minimal() -> schema.Profile:
    roof = schema.Roofline(bytes=10, flops=20, floor_ms=0.5, bound="memory", time_over_floor=2.0)
    return schema.Profile(
        created="2026-01-01T00:00:00+00:00", command=["x"], host={"cpu_count": 2}, backend={"platform": "cpu"},
        run={"dtype": "float32", "gamma": 3}, models={"target": {"name": "t"}},
        steps=[schema.StepRecord(kind="decode", batch=1, context=64, q_len=1, time_ms=1.0, times_ms=[1.0, 1.25],
                                 compile_s=0.5, roofline=roof)],
        drafter=[schema.DrafterRecord(batch=1, context=64, gamma=3, parallel_ms=0.25, propose_ms=0.5, head_ms=0.25,
                                      ingest_ms=0.125, compile_s={"parallel": 1.0}, roofline=roof)],
        sps=[schema.SpsRecord(slots=1, context=64, budget=4, time_ms=2.0, sps=500.0, compile_s=1.0, roofline=roof)],
        prefill=[schema.PrefillRecord(batch=1, length=64, time_ms=3.0, times_ms=[3.0], tokens_per_s=21333.3,
                                      compile_s=1.0, roofline=roof)],
        skipped=[schema.Skipped(what="cell", reason="too big", batch=256, context=32768)],
        status="complete")


@pytest.mark.parametrize("source", ["minimal"] + FAKE)
def test_profile_round_trips(tmp_path, source):
    prof = _minimal() if source == "minimal" else schema.read_profile(source)
    path = schema.write_profile(str(tmp_path / "p.json"), prof)
    back = schema.read_profile(path)
    assert back == prof
    assert back.to_dict() == json.load(open(path))
    assert back.schema_version == schema.SCHEMA_VERSION and back.schema == schema.SCHEMA
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write leaves no temp file


def _bad(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DSparkError) as e:
        schema.read_profile(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_profile_files_give_one_line_errors(tmp_path):
    good = _minimal().to_dict()
    assert "not valid JSON" in _bad(tmp_path, "{not json")
    assert "not a dspark-jax backend profile" in _bad(tmp_path, {"hello": 1})
    assert "not a dspark-jax backend profile" in _bad(tmp_path, [1, 2])
    newer = dict(good, schema_version=schema.SCHEMA_VERSION + 1)
    assert "schema version" in _bad(tmp_path, newer)
    missing = dict(good)
    del missing["backend"]
    assert "missing field 'backend'" in _bad(tmp_path, missing)
    wrong = json.loads(json.dumps(good))
    wrong["steps"][0]["batch"] = "one"
    assert "steps[0].batch" in _bad(tmp_path, wrong)
    status = dict(good, status="exploded")
    assert "status" in _bad(tmp_path, status)
    with pytest.raises(DSparkError, match="no such profile"):
        schema.read_profile(str(tmp_path / "absent.json"))


# ----------------------------------------------------------------------------- roofline

def test_roofline_arithmetic_on_the_tiny_config():
    """qwen3_tiny: V 256, D 64, F 128, 4 layers, 8 query heads over 4 KV heads of 16, untied, f32."""
    cfg = qcfg.qwen3_tiny()
    cm = rl.target_cost(cfg)
    # per layer: q 64*8*16 + k, v 2*64*4*16 + o 8*16*64 + MLP 3*64*128 = 49152 matmul weights
    assert cm.matmul_params == 4 * 49152 + 256 * 64 == 212992
    # streamed: every parameter except the (gathered) input embedding: 230080 - 16384 = 213696 floats
    assert cfg.num_params() == 230080
    assert cm.weight_bytes == 213696 * 4 == 854784
    # K/V per position: 4 layers x (K + V) x 4 heads x 16 x 4 bytes = 2048
    assert cm.kv_bytes_per_position(100) == 2048
    # batch 2, context 100, q_len 3: bytes = weights + 2 rows x 100 positions x 2048
    nbytes, flops = rl.step_cost(cm, 2, 100, 3)
    assert nbytes == 854784 + 2 * 100 * 2048 == 1264384
    # FLOPs = 2 x 212992 x 6 tokens + 6 tokens x 4 layers x 4 x (8 x 16) x 100 keys
    assert flops == 2 * 212992 * 6 + 6 * 4 * 4 * 128 * 100 == 3784704
    # floor and ratio: at 1 GB/s and 1 GFLOP/s compute sets the floor (3.784704 ms)
    r = rl.roofline(7.569408e-3, nbytes, flops, 1e9, 1e9)
    assert r.bound == "compute" and r.floor_ms == pytest.approx(3.784704) and r.time_over_floor == pytest.approx(2.0)
    r = rl.roofline(25.28768e-3, nbytes, flops, 1e8, 1e9)  # 0.1 GB/s: memory (12.64384 ms)
    assert r.bound == "memory" and r.floor_ms == pytest.approx(12.64384) and r.time_over_floor == pytest.approx(2.0)
    # prefill of 4 tokens: causal keys 1+2+3+4 = 10; bytes add the K/V written
    assert rl.prefill_cost(cm, 1, 4) == (854784 + 4 * 2048, 2 * 212992 * 4 + 4 * 4 * 128 * 10)
    # packed: 6 tokens over 2 rows read 2 rows of K/V
    assert rl.packed_cost(cm, 2, 6, 100) == (1264384, 3784704)
    # tied embeddings: the table is the LM head, so it is streamed (same total here)
    tied = rl.target_cost(qcfg.qwen3_tiny(tie_word_embeddings=True))
    assert tied.weight_bytes == qcfg.qwen3_tiny(tie_word_embeddings=True).num_params() * 4 == 854784
    # bf16 halves the bytes, not the FLOPs
    half = rl.target_cost(qcfg.qwen3_tiny(dtype="bfloat16"))
    assert rl.step_cost(half, 2, 100, 3) == (1264384 // 2, 3784704)


def test_roofline_sliding_window_and_drafter():
    from dspark_jax.config_gemma4 import gemma4_tiny
    from dspark_jax.drafters.config import DrafterConfig
    from dspark_jax.drafters.dspark import BlockDrafter

    # gemma4_tiny caches layers 0-3 (S, S, F, S; the last two share K/V), 128 bytes per position
    # each; sliding layers read at most their 4-position window
    assert rl.target_cost(gemma4_tiny()).kv_read_bytes(1, 10) == 128 * (4 + 4 + 10 + 4)
    t = qcfg.qwen3_tiny()
    d = BlockDrafter(DrafterConfig(arch=t.replace(num_hidden_layers=1), target_layer_ids=(0, 1), block_size=4,
                                   markov_rank=16), t, 3)
    nbytes, flops = rl.drafter_propose_cost(d, 2, 10)
    # layer 49152 + norms 224 floats, the target's LM head 256x64, context K/V 2 x 10 x 512,
    # the rank-16 head read at each of 3 steps
    assert nbytes == (49152 + 224) * 4 + 256 * 64 * 4 + 2 * 10 * 512 + 3 * 16 * 256 * 4
    assert flops == 2 * 49152 * 2 * 4 + 2 * 4 * 4 * 128 * (10 + 4) + 2 * 16384 * 2 * 3 + 2 * 16 * 256 * 2 * 3


# ----------------------------------------------------------------------------- report

def test_report_renders_two_fake_backends(tmp_path):
    out = render(FAKE, str(tmp_path), tau=3.2)
    md = open(out["markdown"]).read()
    for name in PLOTS:
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 5000, name
        assert f"({name})" in md
    for needle in ("FakeGPU H1", "FakeTPU v9", "## Decode step time vs batch", "## Verification step",
                   "## Step time against the roofline floor", "## SPS(B)", "## Drafter", "## Prefill",
                   "## Expected per-user speedup of DSpark at tau = 3.2", "## Skipped", "fake_gpu_qwen3_4b.json"):
        assert needle in md, needle
    # the speedup rows: T_decode / ((T_draft + T_verify) / tau), from the file's own records
    p = schema.read_profile(FAKE[0])
    row = speedup_rows(p, 3.2)[0]
    dec, ver, dr = p.step("decode", 1, 512, 1), p.step("verify", 1, 512, 8), p.drafter_at(1, 512)
    assert row["speedup"] == pytest.approx(dec.time_ms / ((dr.propose_ms + dr.ingest_ms + ver.time_ms) / 3.2))
    assert f"**{row['speedup']:.2f}x**" in md


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    from serve import report as report_cli

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit) as e:
        report_cli.main([str(bad), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve.report: error:") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        report_cli.main([FAKE[0], "--out", str(tmp_path / "r"), "--tau", "0"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- measuring

@pytest.fixture(scope="module")
def tiny_pair():
    from dspark_jax import mesh as mesh_lib

    mesh = mesh_lib.make_mesh("1x1")
    return pairs.load_pair(target_dir=TINY, draft_dir=None, preset=None, dtype=None, gamma=2, mesh=mesh), mesh


def test_memory_check_scales_batches_down(tiny_pair):
    from serve.profiling import measure

    pair, mesh = tiny_pair
    s = resolve_settings(gamma=2, batches=[64], contexts=[256], quick=True)
    prof = measure.Profiler(pair, s, mesh, None, [])
    need4 = prof.cell_need(4, 256)
    assert prof.cell_need(8, 256) > need4 > prof.cell_need(2, 256)
    prof.free = lambda: need4 + 1
    assert prof._fit_batch(64, 256, set()) == 4
    assert "scaled down to batch 4" in prof.profile.skipped[-1].reason
    prof.free = lambda: 1
    assert prof._fit_batch(64, 256, set()) is None
    assert "GiB free" in prof.profile.skipped[-1].reason


def test_preset_that_does_not_fit_writes_a_failed_profile(tmp_path, monkeypatch):
    from dspark_jax import mesh as mesh_lib
    from serve.profiling import measure

    monkeypatch.setattr(measure, "free_memory", lambda devices: 2 ** 30)
    mesh = mesh_lib.make_mesh("1x1")
    pair = pairs.load_pair(target_dir=None, draft_dir=None, preset="qwen3-4b", dtype="bfloat16", gamma=7, mesh=mesh)
    out = str(tmp_path / "p.json")
    prof = measure.Profiler(pair, resolve_settings(gamma=7, quick=True), mesh, out, [])
    with pytest.raises(DSparkError, match="do not fit"):
        prof.run()
    back = schema.read_profile(out)
    assert back.status == "failed" and "do not fit" in back.error
    assert back.skipped[0].what == "model" and back.models["target"]["num_params"] == qcfg.qwen3_4b().num_params()


def test_interrupted_profile_keeps_what_it_measured(tmp_path, tiny_pair):
    from serve.profiling import measure

    pair, mesh = tiny_pair
    s = resolve_settings(gamma=2, batches=[1], contexts=[32], q_lens=[3], quick=True, warmup=0, repeats=1)
    out = str(tmp_path / "p.json")

    def progress(what):
        if what == "verify":  # Ctrl-C right after the second measurement
            raise KeyboardInterrupt

    prof = measure.Profiler(pair, s, mesh, out, ["test"], progress=progress)
    with pytest.raises(KeyboardInterrupt):
        prof.run()
    back = schema.read_profile(out)
    assert back.status == "interrupted"
    assert [(r.kind, r.q_len) for r in back.steps] == [("decode", 1), ("verify", 3)]
    assert back.calibration["memory_bandwidth"]["bytes_per_s"] > 0


def _quick_profile(tmp_path, tparams_folder):
    from serve import profile as profile_cli

    out = str(tmp_path / "cpu_tiny.json")
    profile_cli.main(["--target", TINY, "--draft", tparams_folder, "--quick", "--batch", "2", "--context", "32",
                      "--gamma", "2", "--q-len", "3", "--prefill-len", "16", "--sps-budgets", "6,7",
                      "--warmup", "0", "--repeats", "1", "--quiet", "--out", out])
    return out


@pytest.mark.slow
def test_quick_cpu_profile_of_the_tiny_pair_end_to_end(tmp_path, capsys):
    """`serve.profile --quick` on the tiny fixture with a saved random DSpark drafter, then the report."""
    from dspark_jax import target
    from tests.helpers import make_block_drafter, write_block_drafter

    tcfg, tparams = target.load(TINY)
    drafter, dparams = make_block_drafter(tcfg, block_size=4, taps=(0, 1))
    dfolder = write_block_drafter(tmp_path / "drafter", TINY, tparams, drafter, dparams)
    t0 = time.perf_counter()
    out = _quick_profile(tmp_path, dfolder)
    secs = time.perf_counter() - t0
    prof = schema.read_profile(out)
    assert prof.status == "complete" and prof.error is None, prof.error
    assert prof.backend["platform"] == "cpu" and prof.run["source"] == "folders"
    assert not prof.run["random_drafter"] and prof.models["drafter"]["gamma"] == 2 == prof.run["gamma"]
    assert prof.models["target"]["num_params"] == tcfg.num_params()
    assert prof.calibration["matmul"]["flops_per_s"] > 0
    assert "RSS" in prof.memory["source"] and prof.memory["peak_bytes"] > 0
    assert [(s.kind, s.batch, s.q_len) for s in prof.steps] == [("decode", 2, 1), ("verify", 2, 3)]
    for s in prof.steps:
        assert s.time_ms > 0 and s.compile_s > 0 and s.roofline.floor_ms > 0
        assert s.roofline.time_over_floor == pytest.approx(s.time_ms / s.roofline.floor_ms)
        assert (s.roofline.bytes, s.roofline.flops) == rl.step_cost(rl.target_cost(tcfg), s.batch, 32, s.q_len)
    assert [(d.batch, d.context) for d in prof.drafter] == [(2, 32)]
    assert all(d.propose_ms > 0 and d.ingest_ms > 0 for d in prof.drafter)
    assert [(r.slots, r.budget) for r in prof.sps] == [(2, 6)] and prof.sps[0].sps > 0
    # budget 7 is more than 2 slots x (1 + gamma) can hold: skipped, and said so
    assert [(k.what, k.q_len) for k in prof.skipped] == [("sps", 7)]
    assert [(r.batch, r.length) for r in prof.prefill] == [(1, 16)] and prof.prefill[0].tokens_per_s > 0
    assert "5 measurements, 1 skipped" in capsys.readouterr().out
    rep = render([out] + FAKE[:1], str(tmp_path / "report"), tau=2.0)
    assert all(os.path.exists(p) for p in rep["plots"])
    assert "CPU x" in open(rep["markdown"]).read()
    print(f"quick tiny profile took {secs:.1f} s")


def test_profile_cli_rejects_bad_flags(capsys):
    from serve import profile as profile_cli

    for argv in (["--target", TINY, "--batch", "one"], ["--target", TINY, "--context", "0", "--quick"],
                 ["--preset", "qwen3-4b", "--target", TINY], ["--target", TINY, "--q-len", "9", "--gamma", "2"],
                 ["--target", TINY, "--mesh", "3"]):
        with pytest.raises(SystemExit) as e:
            profile_cli.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("serve.profile: error:"), (argv, err)
