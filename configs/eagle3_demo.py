"""The Eagle3 baseline for the bundled demo target, sized like configs/dspark_demo.py for a
small CPU host (2 cores, 2 GiB of free RAM, mesh 1x1): one chain-drafting layer, trained
with training-time test over 7 steps."""

from configs.dspark_demo import CONFIG as DSPARK

CONFIG = DSPARK.replace(drafter="eagle3", ttt_length=7, out_dir="runs/eagle3_demo")
