"""DSpark drafter for the bundled demo target (artifacts/demo/target), sized for a small
CPU host: 2 cores and 2 GiB of free RAM, one CPU device (mesh 1x1).

A short run (40 steps) of the recipe that trained the bundled drafters; the full demo
recipe (more prompts, 1600 steps) stays `python -m train.demo.recipe`. Paths are relative
to the repository root, where the README's commands run (work/ and runs/ are not committed):

    python -m train.regenerate --target artifacts/demo/target --prompts work/demo_prompts.jsonl \
        --out work/demo_answers.jsonl --max-new-tokens 96 --batch-size 64 --val-fraction 0.2 \
        --name demo --data-dir work/data
    python -m train.train --config configs/dspark_demo.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    target="artifacts/demo/target", data_dir="work/data", dataset="demo", drafter="dspark", draft_layers=1,
    draft_intermediate_size=768, block_size=7, target_layer_ids=(4, 5, 6), markov_rank=64,
    markov_head_type="vanilla", confidence_head=True,
    mask_token="<|mask|>", num_anchors=16, seq_len=160, batch_size=16, steps=40, lr=3e-3, warmup_frac=0.04,
    ttt_length=7, compute_dtype="float32", mesh="1x1", out_dir="runs/dspark_demo", ckpt_every=20, log_every=5,
)
