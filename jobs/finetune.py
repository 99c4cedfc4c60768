"""ARM finetuning (recipe finetune_<size>, size from --model, default arm_base_pz16: 8 GPU workers x 128).

    python jobs/finetune.py --model arm_tiny_pz4 --finetune runs/pretrain_tiny-<hash>/checkpoint_<step>
    ray job submit --working-dir . -- python jobs/finetune.py --model arm_base_pz16 --finetune s3://.../checkpoint-1599.pth
--finetune takes a run checkpoint folder (local or s3://) or an official checkpoint-*.pth; --dry-run prints the config.
"""

import logging
import sys

from arm_platform import launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch.fit(launch.recipe_for("finetune", sys.argv[1:]), overrides=sys.argv[1:])
