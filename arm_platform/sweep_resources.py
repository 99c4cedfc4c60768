"""The Ray cluster resources of a sweep's trials: what one trial needs at its peak, what it keeps while the others
plan, and how many trials fit side by side without a Ray Data deadlock (used by `sweep.tune`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from arm_platform.config import TrainConfig

TRIAL_DRIVER_CPUS = 0.1
"""CPU reserved by each trial's driver process (it only waits on its TorchTrainer)."""
READ_METADATA_TASK_CPUS = 1.0
"""CPU of each Parquet sampling task `ray.data.read_parquet` starts in the trial driver before its workers start
(`_fetch_parquet_file_info` in ray/data/_internal/datasource/parquet_datasource.py: a `cached_remote_fn` with no
num_cpus, i.e. Ray's default 1 CPU; the parallel file-size fetch for >= 16 remote paths is the same). The driver
waits for them, so one must fit next to the other trials' reservations."""


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """Cluster resources one trial holds at its peak: its driver, plus its Train workers and one Ray Data decode task
    while training, or one Ray Data Parquet sampling task (READ_METADATA_TASK_CPUS) while its datasets are planned.

    A trial that cannot get either deadlocks (the driver waits for the sampling task forever, a worker for data).
    """
    c = cfg.cluster
    need = {"CPU": TRIAL_DRIVER_CPUS + max(_training_cpus(cfg), READ_METADATA_TASK_CPUS)}
    if c.use_gpu:
        need["GPU"] = c.num_workers * c.gpus_per_worker
    return need


def trial_holdings(cfg: TrainConfig) -> dict[str, float]:
    """What one trial holds while it trains: its driver, Train workers and one decode task (no sampling task)."""
    return trial_resources(cfg) | {"CPU": TRIAL_DRIVER_CPUS + _training_cpus(cfg)}


def _training_cpus(cfg: TrainConfig) -> float:
    return cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + cfg.data.decode_cpus


def max_concurrent_trials(
    need: Mapping[str, float], available: Mapping[str, float], held: Mapping[str, float] | None = None
) -> int:
    """How many trials fit side by side; ValueError naming every short resource when not even one does.

    need: one trial's peak (`trial_resources`); held: what each OTHER trial keeps meanwhile (`trial_holdings`;
    default `need`). k trials fit when (k - 1) * held + need fits: a trial planning its datasets waits for its
    Parquet sampling task only while the others' training keeps their CPUs; the sampling tasks of two planning
    trials just run one after the other (they need nothing else), so the peak of one is enough.
    """
    held = need if held is None else held
    needed = {r: a for r, a in need.items() if a > 0}
    short = [
        f"{a:g} {r} (the Ray cluster has {float(available.get(r, 0.0)):g})"
        for r, a in needed.items()
        if float(available.get(r, 0.0)) + 1e-9 < a
    ]
    if short:
        raise ValueError(
            f"one trial needs {' and '.join(short)} for {describe(need)}; lower cluster.num_workers / "
            "cpus_per_worker / gpus_per_worker, or add nodes"
        )
    per_resource = (1 + math.floor((float(available[r]) - a) / (held.get(r) or a) + 1e-9) for r, a in needed.items())
    return max(1, min(per_resource, default=1))


def describe(need: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in need.items())
