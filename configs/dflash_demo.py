"""The DFlash baseline for the bundled demo target, sized like configs/dspark_demo.py for
a small CPU host (2 cores, 2 GiB of free RAM, mesh 1x1): the DSpark demo run without the
sequential and confidence heads."""

from configs.dspark_demo import CONFIG as DSPARK

CONFIG = DSPARK.replace(drafter="dflash", out_dir="runs/dflash_demo")
