"""README demo on CPU: pretrain ARM-tiny on the Fashion-MNIST shards (recipe pretrain_tiny), then finetune it
(finetune_tiny) and the same finetune from scratch; prints both accuracies. Extra args are overrides of both runs.

    python jobs/demo.py [--output_dir runs] [--world_size 2]
"""

import logging
import sys

from arm_platform import demo

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    scores = demo.run(sys.argv[1:])
    print("\n".join(f"{name:>28}: {value:6.2f}" for name, value in scores.items()))
