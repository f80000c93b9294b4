"""Drafters: DSpark (parallel backbone + sequential head + confidence), DFlash, Eagle3."""

from dspark_jax.drafters.loading import load  # noqa: F401
