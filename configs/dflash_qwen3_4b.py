"""The DFlash baseline for Qwen3-4B: the DSpark recipe without sequential/confidence heads."""

from configs.dspark_qwen3_4b import CONFIG as DSPARK

CONFIG = DSPARK.replace(drafter="dflash", out_dir="runs/dflash_qwen3_4b")
