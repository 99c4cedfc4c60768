"""Ray Tune sweep over finetuning hyperparameters (recipe finetune_<size of --model>, default finetune_base).

Search space: recipes.SEARCH_SPACES, edited with `--space optim.blr=loguniform:1e-4:1e-3`; ASHA on val_acc1, `--optuna`
for TPE. Re-running the same `--sweep-name` resumes the sweep; `--register NAME` registers the best checkpoint.
Cluster: any Ray cluster (`ray job submit --working-dir . -- python jobs/tune_finetune.py --sweep-name s1 ...`).
"""

import logging
import sys

from arm_platform import sweep

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sweep.main(sys.argv[1:])
