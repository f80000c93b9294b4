"""The Eagle3 baseline for Qwen3-4B: one chain-drafting layer, training-time test over 7 steps.
Sized like configs/dspark_qwen3_4b.py for a TPU v5p pod slice of hundreds of chips (set
`mesh` to the slice's chip count); its loss reads the target's full vocabulary at every
position of every step, so it needs more memory per sequence than DSpark's."""

from configs.dspark_qwen3_4b import CONFIG as DSPARK

CONFIG = DSPARK.replace(drafter="eagle3", draft_layers=1, target_layer_ids=(1, 17, 33), ttt_length=7,
                        ttt_decay=0.8, out_dir="runs/eagle3_qwen3_4b")
