"""Checks the dense targets' parity tests share, against a fixture's golden.npz of
transformers' outputs (prompt_ids, prompt_lengths, logits_i, hidden_states_0 with index
i + 1 the output of layer i, last_layer_raw_0: the last layer before the final norm)."""

from __future__ import annotations

import jax.numpy as jnp

from dspark_jax import target


def golden_prompts(g) -> list[list[int]]:
    """The fixture's two prompts, unpadded."""
    return [g["prompt_ids"][i, :g["prompt_lengths"][i]].tolist() for i in range(2)]


def assert_padded_prefill_matches(cfg, params, g, tol: float):
    """Both prompts in one right-padded batch give the reference logits at every real position."""
    lengths = jnp.asarray(g["prompt_lengths"])
    h, _, _ = target.forward(cfg, params, jnp.asarray(g["prompt_ids"]), lengths)
    lg = target.logits(cfg, params, h)
    for i in range(2):
        n = int(lengths[i])
        assert float(jnp.abs(lg[i, :n] - g[f"logits_{i}"]).max()) <= tol, i


def assert_taps_are_raw(cfg, params, g, tol: float):
    """Tapping layers -1 .. L-1 returns the embeddings and each decoder layer's raw output."""
    prompt = golden_prompts(g)[0]
    layers = tuple(range(-1, cfg.num_hidden_layers))
    _, _, taps = target.forward(cfg, params, jnp.array([prompt]), jnp.array([len(prompt)]), tap_layers=layers)
    hs = g["hidden_states_0"]  # transformers normalises its last entry
    for layer, tap in zip(layers[:-1], taps[:-1]):
        assert float(jnp.abs(tap[0] - hs[layer + 1]).max()) <= tol, layer
    assert float(jnp.abs(taps[-1][0] - g["last_layer_raw_0"]).max()) <= tol
