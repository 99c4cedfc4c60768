"""Ray Data pipeline (the only data module that imports Ray): Parquet shards -> decoded, augmented uint8 batches.

    read_parquet (local or S3, explicit shard list from the manifest)
      (one read task per shard, blocks of ~decode_batch_size rows, shard order shuffled each epoch for train)
      -> [limit] -> map_batches(BatchTransform) on CPU, fractional `decode_cpus` per task
                                                                   rows: image uint8 (3, H, W), label
      -> per Train worker: iter_batches(get_dataset_shard(...)) -> normalised float on the worker's device.
Corrupt records leave the decode step with label -1; `iter_batches` drops and counts them (`.num_corrupt`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import ray.data
import torch

from arm_platform import storage
from arm_platform.config import DataConfig
from arm_platform.data.manifest import Manifest, check_data_path, read_manifest
from arm_platform.data.transforms import BatchTransform, Mode, normalize, random_erasing
from arm_platform.data.watchdog import watch_stalls

logger = logging.getLogger(__name__)

COLUMNS = ["image", "label"]

__all__ = [
    "BatchIterable",
    "build_datasets",
    "check_data_path",
    "iter_batches",
    "ray_system_config",
    "read_manifest",
    "read_shards",
]


def ray_system_config(cfg: DataConfig, num_cpus: float, train_workers: int = 0) -> dict[str, int]:
    """`ray.init(_system_config=...)` for a Ray node whose decode tasks use fractional CPUs.

    Ray keeps about `num_cpus` idle worker processes and kills the rest within a second, so with e.g. 0.25-CPU
    decode tasks every wave of tasks restarted workers (a torch import each): measured 3x slower on 2 cores.
    Raising the soft limit to the number of concurrent tasks keeps them warm. For `ray start` nodes set the
    environment variable RAY_num_workers_soft_limit to the same value.
    """
    decode_tasks = math.ceil(num_cpus / min(cfg.decode_cpus, 1.0))
    return {"num_workers_soft_limit": int(max(num_cpus, decode_tasks + train_workers + 2))}


def read_shards(
    uris: list[str], rows: int, cfg: DataConfig, *, shuffle_files: bool = False, limit: int | None = None
) -> ray.data.Dataset:
    """Raw rows {"image": JPEG bytes, "label": int64} of Parquet shards holding `rows` rows on one filesystem.

    One read task per shard, its output cut into blocks of about `cfg.decode_batch_size` rows, so one decode task
    takes one block and a few shards still feed many parallel decode tasks. Ray's default cut (~200 blocks per
    dataset) made 20-row blocks and halved throughput; a separate repartition step cost a third. Read tasks reserve
    `cfg.decode_cpus` like the decode tasks. Uses Ray's file-based Parquet reader: the footer-indexing V2 reader
    starts an actor pool on every execution (each epoch), ~10 s on a small node, for no gain with our few large files.
    """
    if not uris:
        raise ValueError("no shards to read")
    fs, _ = storage.filesystem_for(uris[0])
    paths = [storage.filesystem_for(u)[1] for u in uris]
    rows = min(rows, limit) if limit is not None else rows
    ctx = ray.data.DataContext.get_current()
    use_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            paths,
            filesystem=fs,
            columns=COLUMNS,
            file_extensions=None,
            shuffle="files" if shuffle_files else None,
            override_num_blocks=max(len(paths), math.ceil(rows / cfg.decode_batch_size)),
            num_cpus=cfg.decode_cpus,
        )
    finally:
        ctx.use_datasource_v2 = use_v2
    return ds if limit is None else ds.limit(limit)


def decoded(
    ds: ray.data.Dataset, cfg: DataConfig, mode: Mode, seed: int | None = None, **ray_remote_args: Any
) -> ray.data.Dataset:
    """Decode + augment on CPU: rows become {"image": uint8 (3, S, S), "label": int64} (label -1: corrupt).

    Each task reserves `cfg.decode_cpus` CPUs and runs torch on `transforms.threads_for(decode_cpus)` threads
    (`BatchTransform` sets them), whatever OMP_NUM_THREADS the Ray workers inherited. `ray_remote_args` go to
    `map_batches` (e.g. a runtime_env, as benchmarks/data.py does to export OMP_NUM_THREADS to the tasks).
    """
    return ds.map_batches(
        BatchTransform(cfg, mode, seed),
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
        udf_modifying_row_count=False,
        **ray_remote_args,
    )


def _first_shards(manifest: Manifest, split: str, rows: int | None) -> tuple[list[str], int]:
    """(URIs, total rows) of the fewest leading shards of `split` holding `rows` rows (all shards for None).

    Ingest shuffles images across shards, so the first rows are a random, fixed subset of the split.
    """
    uris, shards = manifest.shard_uris(split), manifest.shards[split]
    total = 0
    for i, shard in enumerate(shards):
        total += shard.rows
        if rows is not None and total >= rows:
            return uris[: i + 1], total
    return uris, total


def _read_split(manifest: Manifest, split: str, cfg: DataConfig, limit: int | None, shuffle: bool) -> ray.data.Dataset:
    uris, rows = _first_shards(manifest, split, limit)
    return read_shards(uris, rows, cfg, shuffle_files=shuffle, limit=limit)


def build_datasets(
    cfg: DataConfig, task: str, manifest: Manifest | None = None, *, probe: bool = False
) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} (+ "probe") Ray datasets of decoded uint8 images.

    train: train augment ("pretrain": random resized crop + flip; "finetune": timm RandAugment pipeline), shard
    order reshuffled every epoch, capped at `max_train_samples` rows drawn from the fewest leading shards (ingest
    shuffled images across shards, so that is a random subset), read `train_repeats` times per epoch (each pass with its
    own augmentation). val: eval transform, first `max_val_samples`.
    probe, eval transform: pretraining's labelled kNN / linear-probe bank (`probe_split` whole, or the first
    `max_val_samples` train images); with `probe` for finetuning, the train images themselves (head_init="probe").
    """
    if task not in ("pretrain", "finetune"):
        raise ValueError(f"task must be pretrain or finetune, got {task!r}")
    manifest = manifest or read_manifest(cfg.data_path, attempts=cfg.io_retries)
    # Ray Data's per-operator bars flood job logs; the training loop prints one progress line every N steps.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train = [_read_split(manifest, cfg.train_split, cfg, cfg.max_train_samples, True) for _ in range(cfg.train_repeats)]
    out = {
        "train": decoded(train[0].union(*train[1:]) if len(train) > 1 else train[0], cfg, task),
        "val": decoded(_read_split(manifest, cfg.val_split, cfg, cfg.max_val_samples, False), cfg, "eval"),
    }
    if task == "pretrain":
        split, limit = (cfg.probe_split, None) if cfg.probe_split else (cfg.train_split, cfg.max_val_samples)
        out["probe"] = decoded(_read_split(manifest, split, cfg, limit, False), cfg, "eval")
    elif probe:
        out["probe"] = decoded(_read_split(manifest, cfg.train_split, cfg, cfg.max_train_samples, False), cfg, "eval")
    return out


class BatchIterable:
    """Re-iterable per-worker batches {"image": float (B, 3, H, W) normalised, "label": long (B,)} on `device`, from
    a Ray dataset or Train dataset shard (`ray.train.get_dataset_shard(name)`).

    Records that failed to decode are dropped (a batch may come out smaller) and counted in `num_corrupt`.

    Args:
        reprob: finetune training only: timm random erasing probability (pixel mode), applied after normalising.
        local_shuffle_buffer_size: optional extra row shuffle on the worker (Ray's local shuffle buffer).
        source: what the batches come from, named in stall warnings / errors (e.g. "train split of s3://b/imagenet").
        stall_warn_s / stall_timeout_s: warn each time no batch arrived for this long; raise `DataStallError` after
            the timeout (0: never), see `watchdog.watch_stalls`.
    """

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        device: torch.device | str,
        *,
        drop_last: bool,
        reprob: float = 0.0,
        local_shuffle_buffer_size: int | None = None,
        prefetch_batches: int = 2,
        source: str = "dataset",
        stall_warn_s: float = 60.0,
        stall_timeout_s: float = 0.0,
    ) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.reprob = reprob
        self.local_shuffle_buffer_size = local_shuffle_buffer_size
        self.prefetch_batches = prefetch_batches
        self.num_corrupt = 0
        self.source, self.stall_warn_s, self.stall_timeout_s = source, stall_warn_s, stall_timeout_s

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        erase = random_erasing(self.reprob, self.device) if self.reprob > 0 else None
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            device="cpu",
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.local_shuffle_buffer_size,
            pin_memory=self.device.type == "cuda",
        )
        batches = watch_stalls(batches, source=self.source, warn_s=self.stall_warn_s, timeout_s=self.stall_timeout_s)
        for batch in batches:
            images, labels = batch["image"], batch["label"]
            ok = labels >= 0
            if not bool(ok.all()):
                self.num_corrupt += int((~ok).sum())
                logger.warning("dropped %d corrupt records (%d so far)", int((~ok).sum()), self.num_corrupt)
                images, labels = images[ok], labels[ok]
                if len(labels) == 0:
                    continue
            x = normalize(images, self.device)
            if erase is not None:
                x = erase(x)
            # Ray hands out read-only object-store memory: images become a new float tensor, labels get copied.
            yield {"image": x, "label": labels.to(self.device, non_blocking=True, copy=True)}


iter_batches = BatchIterable
"""`iter_batches(shard, batch_size, device, drop_last=...)`: the name the training loop and tests call."""
