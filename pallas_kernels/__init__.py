"""Pallas kernels for paged attention (TPU: Mosaic, GPU: Triton), each with a jnp reference.

- `verify_attention`: the target's decode / speculative-verification attention over a
  paged KV cache (causal with the cache offset, GQA, sliding window, soft cap).
- `block_attention`: the drafter's block queries over [paged context ; block K/V].

`impl="auto"` picks the kernel of `jax.default_backend()` (the reference on CPU); both
kernels run on CPU with `interpret=True`. See README.md here for what was verified where.
"""

from pallas_kernels.block_attention import block_attention, block_attention_reference
from pallas_kernels.verify_attention import verify_attention, verify_attention_reference

__all__ = ["block_attention", "block_attention_reference", "verify_attention", "verify_attention_reference"]
