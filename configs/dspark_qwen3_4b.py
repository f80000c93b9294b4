"""DSpark drafter for Qwen3-4B with the DeepSpec defaults, sized for a TPU v5p pod slice of
hundreds of chips (95 GiB HBM each): the global batch of 512 sequences of 4096 tokens is
split over the `data` axis, so set `mesh` to the slice's chip count (e.g. mesh=512x1, one
sequence per chip). The 8x1 below is one host's 8 devices; there, train with a smaller
batch_size / seq_len, and the memory check before the first step says whether it fits.

    python -m train.train --config configs/dspark_qwen3_4b.py --set target=/path/Qwen3-4B \
        --set data_dir=/path/data --set dataset=regen --set mesh=512x1 --distributed
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    drafter="dspark", draft_layers=5, block_size=7, target_layer_ids=(1, 9, 17, 25, 33),
    markov_rank=256, markov_head_type="vanilla", confidence_head=True, mask_token="151669",
    num_anchors=512, loss_decay=4.0, seq_len=4096, batch_size=512, steps=25000, lr=6e-4,
    warmup_frac=0.04, weight_decay=0.0, grad_clip=1.0, compute_dtype="bfloat16", mesh="8x1",
    out_dir="runs/dspark_qwen3_4b", ckpt_every=1000, log_every=50,
)
