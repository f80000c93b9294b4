"""Deterministic, per-host, resumable batches from a random-access data source.

The batch of global step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
draws a fresh permutation seeded by (seed, e), and host p of P takes its contiguous
slice of the global batch. The data position is therefore just the step, so a resumed
run continues on exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np

from dspark_jax.errors import DSparkError


def check_ids(ids: np.ndarray, vocab: int, where: str) -> None:
    """Refuse token ids at or past the target's vocabulary (data built for another model)."""
    if ids.size and int(ids.max()) >= vocab:
        raise DSparkError(f"{where} holds token id {int(ids.max())}, outside the target's vocabulary [0, {vocab}): "
                          "the dataset was tokenized for another model; rebuild it with the target's tokenizer")


class BatchLoader:
    def __init__(self, source, *, global_batch: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None):
        self.source = source
        self.vocab_size = vocab_size
        self.size = len(source)
        if global_batch % process_count:
            raise DSparkError(f"batch_size {global_batch} must be a multiple of the {process_count} hosts")
        if self.size < global_batch:
            raise DSparkError(f"the dataset has {self.size} examples, fewer than one batch of {global_batch}")
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seq_len = seq_len
        self.seed = seed
        self.process_index = process_index
        self.steps_per_epoch = self.size // global_batch
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this host's share of global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perm_epoch = epoch
        start = k * self.global_batch + self.process_index * self.local_batch
        return self._perm[start:start + self.local_batch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        ids = np.zeros((self.local_batch, self.seq_len), np.int32)
        mask = np.zeros((self.local_batch, self.seq_len), np.int32)
        lengths = np.zeros((self.local_batch,), np.int32)
        for row, i in enumerate(self.indices(step)):
            ex = self.source[int(i)]
            n = min(len(ex["input_ids"]), self.seq_len)
            ids[row, :n] = ex["input_ids"][:n]
            mask[row, :n] = ex["loss_mask"][:n]
            lengths[row] = n
        if self.vocab_size is not None:
            check_ids(ids, self.vocab_size, f"the batch of step {step + 1}")
        return {"input_ids": ids, "loss_mask": mask, "lengths": lengths}


class PackedLoader:
    """Batches of rows packed end to end with whole conversations (no padding), for
    next-token pretraining: epoch e concatenates the examples in a permutation seeded by
    (seed, e) and cuts the stream into rows of seq_len tokens; a conversation may run on
    into the next row, and attention is causal across the conversations of a row. Like
    BatchLoader, the batch of step s is a pure function of (seed, s), so the data position
    is the step."""

    def __init__(self, source, *, global_batch: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None):
        if global_batch % process_count:
            raise DSparkError(f"batch_size {global_batch} must be a multiple of the {process_count} hosts")
        self.source = source
        self.vocab_size = vocab_size
        self.lengths = np.array([len(source[i]["input_ids"]) for i in range(len(source))], np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seq_len = seq_len
        self.seed = seed
        self.process_index = process_index
        self.steps_per_epoch = int(self.lengths.sum()) // seq_len // global_batch
        if self.steps_per_epoch < 1:
            raise DSparkError(f"the dataset holds {int(self.lengths.sum())} tokens, fewer than one packed batch "
                              f"of {global_batch} x {seq_len}")
        self._epoch, self._order, self._ends = -1, None, None

    def _layout(self, epoch: int):
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            self._ends = np.cumsum(self.lengths[self._order])
            self._epoch = epoch
        return self._order, self._ends

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order, ends = self._layout(epoch)
        s = self.seq_len
        ids = np.zeros((self.local_batch, s), np.int32)
        mask = np.zeros((self.local_batch, s), np.int32)
        first_row = k * self.global_batch + self.process_index * self.local_batch
        for row in range(self.local_batch):
            lo = (first_row + row) * s
            j = int(np.searchsorted(ends, lo, side="right"))
            filled = 0
            while filled < s:
                ex = self.source[int(order[j])]
                start = lo + filled - (int(ends[j]) - int(self.lengths[order[j]]))
                take = min(s - filled, int(self.lengths[order[j]]) - start)
                ids[row, filled:filled + take] = ex["input_ids"][start:start + take]
                mask[row, filled:filled + take] = ex["loss_mask"][start:start + take]
                filled += take
                j += 1
        if self.vocab_size is not None:
            check_ids(ids, self.vocab_size, f"the batch of step {step + 1}")
        return {"input_ids": ids, "loss_mask": mask, "lengths": np.full((self.local_batch,), s, np.int32)}
