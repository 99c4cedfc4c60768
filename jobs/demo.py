"""README demo on CPU (`make demo`): ARM-pretrain arm_tiny on the 60,000 Fashion-MNIST train images, then with 1,000
labels compare linear probes and LP-FT finetunes from the pretrained and from scratch / random-init encoders (a Tune
grid over lr, picked on held-out train images), each scored on the 10,000 test images; prints the table.
Extra args are overrides of both runs; --long pretrains and finetunes twice as long (2 epochs each).

    python jobs/demo.py [--long] [--output_dir runs]
"""

import logging
import sys

from arm_platform import demo

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    args = [a for a in sys.argv[1:] if a != "--long"]
    scores = demo.run(args, long="--long" in sys.argv[1:])
    print(demo.table(scores))
