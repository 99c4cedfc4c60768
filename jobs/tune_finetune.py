"""Ray Tune sweep over finetuning hyperparameters (recipe finetune_<size of --model>, default finetune_base).

Search space: recipes.SEARCH_SPACES, edited with `--space optim.blr=loguniform:1e-4:1e-3`; ASHA on the better of the
raw / EMA val top-1, `--optuna` for TPE. Re-running the same `--sweep-name` resumes the sweep; `--register NAME`
registers the best checkpoint with the weights that scored it (a re-run returns the same version).
Cluster: any Ray cluster (`ray job submit --working-dir . -- python jobs/tune_finetune.py --sweep-name s1 ...`).
"""

import argparse
import logging
import sys

from arm_platform import cli, launch, recipes, sweep
from arm_platform.search_space import parse_space_args

log = logging.getLogger("tune_finetune")


def main(argv: list[str]):  # noqa: ANN201 (ray.tune.ResultGrid | None)
    """Sweep flags, then `--flag value` / dotted overrides of the base recipe."""
    parser = argparse.ArgumentParser(description="Ray Tune sweep over a finetune recipe", allow_abbrev=False)
    parser.add_argument("--recipe", help="finetune recipe; default finetune_<size of --model>, else finetune_base")
    parser.add_argument("--sweep-name", required=True, help="re-running the same name resumes the sweep")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--optuna", action="store_true", help="Optuna TPE search instead of random sampling")
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument("--start-timeout", type=float, default=sweep.TRIAL_START_TIMEOUT_S,
                        help="seconds a trial may wait for cluster resources before it fails")  # fmt: skip
    parser.add_argument("--space", action="append", default=[],
                        help="key=sampler:args, e.g. optim.blr=uniform:1e-4:1e-3")  # fmt: skip
    parser.add_argument("--register", metavar="MODEL_NAME", help="register the best checkpoint under this name")
    args, rest = parser.parse_known_args(argv)
    base = recipes.get(args.recipe) if args.recipe else launch.recipe_for("finetune", rest)
    cfg, dry_run = cli.apply_cli(base, rest)
    space = dict(recipes.SEARCH_SPACES.get(cfg.recipe) or recipes.SEARCH_SPACES[cfg.task])
    space.update(parse_space_args(args.space))
    if dry_run:
        cli.print_config(cfg)
        return None
    results = sweep.tune(
        cfg,
        space,
        num_samples=args.num_samples,
        sweep_name=args.sweep_name,
        use_optuna=args.optuna,
        max_concurrent=args.max_concurrent,
        start_timeout_s=args.start_timeout,
    )
    best = sweep.best_trial(results)
    log.info("best trial %s: %.4f (%s) %s", *(best[k] for k in ("trial_id", "score", "weights", "checkpoint_uri")))
    if args.register:
        version = sweep.register_best(results, cfg, args.register)
        log.info("models:/%s/%s (aliases %s)", args.register, version.version, version.aliases)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(sys.argv[1:])
