"""ARM-H pretraining (recipe pretrain_huge): 8 x 80 GB GPUs, 64 images per GPU with 4-step gradient accumulation to
the official effective batch of 2048, activation checkpointing on (model.grad_checkpointing=false to disable).

    ray job submit --working-dir . -- python jobs/pretrain_huge.py --data_path s3://... --output_dir s3://.../runs
"""

import logging
import sys

from arm_platform import launch, recipes

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch.fit(recipes.get("pretrain_huge"), overrides=sys.argv[1:])
