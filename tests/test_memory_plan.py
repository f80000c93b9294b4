"""DeepSeek-V4 presets and serve.memory_plan: parameter counts in the published range,
the per-layer-kind eval_shape equals the full model's, expert weights halve per device
when the model axis doubles (specs checked on abstract and on simulated-device meshes),
and the CLI's one-line refusals."""

import json
import math

import jax
import pytest
from jax.sharding import PartitionSpec

from configs.models.deepseek_v4 import PRESETS, preset
from dspark_jax import mesh as mesh_lib
from dspark_jax import target
from dspark_jax.checkpoints import read_config
from dspark_jax.config_deepseek_v4 import CSA, HASH_MOE, HCA, SLIDING, DeepseekV4Config
from serve import memory_plan as mp
from tests.conftest import FIXTURES

# Published sizes (billions): total, active per token. The MTP layer (in the folders, not
# in the model) is not counted, so Pro's total lands about one layer (1.7%) short of 1.6T.
PUBLISHED_B = {"deepseek-v4-flash": (284.0, 13.0), "deepseek-v4-pro": (1600.0, 49.0)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_preset_parameter_counts_in_the_published_range(name):
    cfg = preset(name)
    c = mp.counts(cfg, mp.params(cfg))
    total, active = PUBLISHED_B[name]
    print(f"{name}: total {c['total'] / 1e9:.2f}B (published {total:g}B), "
          f"active {c['active'] / 1e9:.2f}B (published {active:g}B)")
    assert abs(c["total"] / 1e9 / total - 1) < 0.03
    assert abs(c["active"] / 1e9 / active - 1) < 0.03


def test_preset_schedules_and_shapes():
    flash, pro = PRESETS["deepseek-v4-flash"], PRESETS["deepseek-v4-pro"]
    assert [flash.count(k) for k in (SLIDING, CSA, HCA)] == [2, 21, 20]
    assert [pro.count(k) for k in (SLIDING, CSA, HCA)] == [0, 30, 31]
    assert pro.layer_types[:3] == (HCA, HCA, CSA)
    for cfg in (flash, pro):
        assert cfg.mlp_layer_types.count(HASH_MOE) == 3 and cfg.dtype == "bfloat16"
        assert cfg.compress_rope.rope_type == "yarn" and cfg.compress_rope.factor == 16
        assert cfg.rope_dim == 64 and cfg.head_dim == 512
    assert (pro.hidden_size, pro.n_routed_experts, pro.moe_intermediate_size, pro.o_groups) == (7168, 384, 3072, 16)
    assert (pro.q_lora_rank, pro.index_topk, pro.routed_scaling_factor) == (1536, 1024, 2.5)
    # frozen: a preset cannot be edited in place
    with pytest.raises(Exception):
        pro.hidden_size = 1


def test_layer_kinds_equal_the_full_eval_shape():
    tiny = DeepseekV4Config.from_hf(read_config(f"{FIXTURES}/deepseek_v4_tiny_a"), dtype="bfloat16")
    cfg = tiny.replace(num_hidden_layers=6, layer_types=tiny.layer_types[:3] * 2,
                       mlp_layer_types=tiny.mlp_layer_types[:3] * 2)   # three kinds, twice each
    shapes, axes = target.param_shapes_and_axes(cfg)
    full = jax.tree.leaves(shapes)
    ps = mp.params(cfg)
    assert len(ps) < len(full)
    assert sum(math.prod(p.shape) * p.count for p in ps) == sum(math.prod(x.shape) for x in full)
    mesh = mp.abstract_mesh(1, 2)
    whole = sum(math.prod(x.shape) * x.dtype.itemsize // math.prod(
        mesh.shape[a] for a in mesh_lib.logical_to_spec(ax, x.shape, mesh) if a)
        for x, ax in zip(full, jax.tree.leaves(axes, is_leaf=mesh_lib._is_axes)))
    assert mp.bytes_per_device(ps, "bf16", 1, 2) == whole


def test_expert_bytes_halve_when_the_model_axis_doubles():
    cfg = preset("deepseek-v4-flash")
    experts = [p for p in mp.params(cfg) if p.role == "expert"]
    assert experts and all(p.axes[0] == "expert" for p in experts)
    for fmt in mp.FORMATS:
        per = {m: mp.bytes_per_device(experts, fmt, 1, m) for m in (1, 2, 4, 8, 16, 32, 64)}
        for m in (1, 2, 4, 8, 16, 32):
            assert per[m] == 2 * per[2 * m], (fmt, m)
        assert mp.bytes_per_device(experts, fmt, 4, 8) == per[8]   # replicated over data
    assert mp.stored_bytes(experts[0], "bf16") > mp.stored_bytes(experts[0], "fp8") > \
        mp.stored_bytes(experts[0], "fp4")
    # the spec the plan divides by is the project's, on an abstract mesh and on devices
    gate_up = next(p for p in experts if p.name.endswith("gate_up_proj"))
    abstract = mesh_lib.logical_to_spec(gate_up.axes, gate_up.shape, mp.abstract_mesh(2, 4))
    real = mesh_lib.logical_to_spec(gate_up.axes, gate_up.shape, mesh_lib.make_mesh("2x4"))
    assert abstract == real == PartitionSpec("model", None, None, None)


def test_cache_per_token_from_the_cache_pytree():
    cfg = preset("deepseek-v4-pro")
    kv = mp.cache_per_token(cfg)
    d, item = cfg.head_dim, 2
    assert kv["kv"] == cfg.num_hidden_layers * d * item
    assert kv["hca_raw"] == cfg.count(HCA) * 2 * d * item
    assert kv["csa_entries"] == cfg.count(CSA) * d * item / cfg.csa_rate
    assert kv["total"] == sum(v for k, v in kv.items() if k != "total")


def test_cli_plan_json_and_markdown(capsys):
    mp.main(["--preset", "deepseek-v4-flash", "--mesh", "1x8", "--weights", "fp8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["mesh"]["gib_per_device"]) == {"fp8"}
    assert {s["hardware"] for s in out["slices"]} == set(mp.HARDWARE)
    v5p = next(s for s in out["slices"] if s["hardware"] == "tpu-v5p")
    assert v5p["fit"]["weights_gib"] <= 0.85 * 95
    mp.main(["--target", f"{FIXTURES}/deepseek_v4_tiny_a"])
    text = capsys.readouterr().out
    assert "| tpu-v5e | 16 | bf16 | 1 (1x1) |" in text


@pytest.mark.parametrize("argv, words", [
    (["--preset", "deepseek-v5"], ["unknown preset 'deepseek-v5'", "deepseek-v4-flash", "deepseek-v4-pro"]),
    (["--preset", "deepseek-v4-pro", "--mesh", "8"], ["mesh must look like DATAxMODEL"]),
    (["--target", f"{FIXTURES}/qwen3_tiny_tied"], ["model_type 'qwen3' is not deepseek_v4"]),
    (["--preset", "deepseek-v4-pro", "--headroom", "1.5"], ["--headroom must be in (0, 1]"]),
])
def test_cli_refusals_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        mp.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
