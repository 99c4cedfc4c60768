"""ARM pretraining (recipe pretrain_<size>, size from --model, default arm_base_pz16: 8 GPU workers x 256).

    python jobs/pretrain.py --model arm_tiny_pz4                     # CPU demo size, local Ray
    ray job submit --working-dir . -- python jobs/pretrain.py --model arm_base_pz16 --data_path s3://... \
        --output_dir s3://.../runs
Official main_pretrain.py flags and dotted overrides (optim.blr=1e-4) are accepted; --dry-run prints the config.
"""

import logging
import sys

from arm_platform import launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch.fit(launch.recipe_for("pretrain", sys.argv[1:]), overrides=sys.argv[1:])
