"""The DFlash baseline for Qwen3-4B: the DSpark recipe without sequential/confidence heads,
sized like configs/dspark_qwen3_4b.py for a TPU v5p pod slice of hundreds of chips (set
`mesh` to the slice's chip count)."""

from configs.dspark_qwen3_4b import CONFIG as DSPARK

CONFIG = DSPARK.replace(drafter="dflash", out_dir="runs/dflash_qwen3_4b")
