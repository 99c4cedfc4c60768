"""Per-worker Ray Train loop: the only per-rank Ray code (dataset shards, prepare_model, report + checkpoint).

`train_loop_per_worker(config)` receives `launch.loop_config(...)`: {"cfg": TrainConfig.to_dict(), "run_name",
"run_uri", "steps_per_epoch", "tracking_uri", "artifact_location", "fault", "hold"}. It resumes from
`ray.train.get_checkpoint()` (worker restarts and re-runs of the same experiment), checkpoints every
`checkpoint.every_n_steps` optimizer steps and at every epoch end (world rank 0 writes the checkpoint; all ranks
call `ray.train.report`, which is a barrier).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import ModelEmaV3

from arm_platform import ops, storage
from arm_platform.config import TrainConfig, flatten
from arm_platform.data.datasets import iter_batches
from arm_platform.data.transforms import set_torch_threads, threads_of
from arm_platform.models import build_model
from arm_platform.security import install_log_redaction
from arm_platform.tracking import NullTracker, build_tracker
from arm_platform.train.checkpoint import load_checkpoint, load_pretrained_weights, save_checkpoint
from arm_platform.train.engine import evaluate, sum_over_workers, train_one_epoch
from arm_platform.train.integrity import (
    CheckpointError,
    download,
    free_checkpoint_name,
    list_checkpoints,
    newest_verified,
)
from arm_platform.train.optim import build_optimizer
from arm_platform.train.probes import PretrainMonitor, init_head_from_probe
from arm_platform.train.schedule import Schedule, build_schedule
from arm_platform.train.tasks import build_task, unwrap

log = logging.getLogger(__name__)

FAULT_ENV = "ARM_FAULT_INJECT"
HOLD_ENV = "ARM_HOLD_AT"
"""Test hook, "<step>:<release file>": every rank writes "<release file>.held-<rank>" and waits at that optimizer step
until the release file exists (a node-loss test removes a node while the workers wait there)."""
"""Test hook, "<step>:<marker file>": the last rank raises once at that optimizer step (launch copies it here)."""

NUM_VIS_IMAGES = 8


class _Run:
    """Everything one worker holds while training (kept small so the loop reads top to bottom)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = TrainConfig.from_dict(config["cfg"])
        self.run_name: str = config["run_name"]
        self.spe: int = config["steps_per_epoch"]
        self.fault: str | None = config.get("fault")
        self.hold: str | None = config.get("hold")
        self.resume_from: str = config.get("resume_from") or ""
        self.run_uri: str = config["run_uri"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.total_steps = self.cfg.optim.epochs * self.spe
        self.schedule: Schedule = build_schedule(self.cfg.optim, num_workers=self.world, steps_per_epoch=self.spe)
        self.tracker: NullTracker = NullTracker()
        self.monitor = PretrainMonitor(self.cfg, self.device)
        self.head_probe: dict[str, float] = {}
        self._t_log, self._step_log = time.perf_counter(), 0

    # ---------------------------------------------------------------- set-up
    def build(self) -> int:
        """Model, EMA, optimizer, task; restores the latest checkpoint. Returns the step to start from."""
        cfg = self.cfg
        seed = cfg.seed + self.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = build_model(cfg.model, cfg.task)
        if cfg.model.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        checkpoint = ray.train.get_checkpoint() or self._resume_checkpoint()
        if cfg.task == "finetune" and cfg.finetune and checkpoint is None:
            load_pretrained_weights(model, cfg.finetune)
        model.to(self.device)
        if cfg.task == "finetune" and cfg.head_init == "probe" and checkpoint is None:
            self._init_head_from_probe(model)
        self.ema = ModelEmaV3(model, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.optimizer = build_optimizer(model, cfg.optim, cfg.task)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs no loss scaling
        step = self._restore(checkpoint, model) if checkpoint is not None else 0
        self.model = ray.train.torch.prepare_model(model)
        self.task = build_task(cfg, self.model)
        return step

    def _init_head_from_probe(self, model: torch.nn.Module) -> None:
        """LP-FT: rank 0 fits the head on the train images' frozen features (eval transform), then broadcasts it."""
        if self.rank == 0:
            tcfg = self.cfg.tracking
            with self.node_threads():
                fit = init_head_from_probe(
                    model,
                    self._val_batches("probe"),
                    l2=tcfg.linear_probe_l2,
                    max_iter=tcfg.linear_probe_max_iter,
                    smoothing=self.cfg.data.smoothing,  # the finetune criterion's (tasks.build_criterion)
                )
            self.head_probe = fit
            log.info("head_init=probe: linear head fitted on the frozen encoder, train %s", fit)
        if self.world > 1:
            for tensor in (model.head.weight.data, model.head.bias.data):
                torch.distributed.broadcast(tensor, src=0)

    def _resume_checkpoint(self) -> ray.train.Checkpoint | None:
        """Official --resume: launch's checkpoint folder, used only while this run has no checkpoint of its own."""
        if not self.resume_from:
            return None
        fs, path = storage.filesystem_for(self.resume_from)
        return ray.train.Checkpoint(path, filesystem=fs)

    def _restore(self, checkpoint: ray.train.Checkpoint, model: torch.nn.Module) -> int:
        """Load Ray's latest checkpoint; if it does not verify, the newest one in the run folder that does."""
        objects = {"model": model, "optimizer": self.optimizer, "scaler": self.scaler, "ema": self.ema}
        try:
            with checkpoint.as_directory() as directory:
                step = load_checkpoint(directory, **objects)["step"]
            log.info("rank %d resumed from step %d", self.rank, step)
            return step
        except CheckpointError as err:
            bad = Path(checkpoint.path).name
            good, rejected = newest_verified(self.run_uri, skip=(bad,))
            for name, reason in [(bad, str(err)), *rejected]:
                log.warning("rank %d skips checkpoint %s: %s", self.rank, name, reason)
            if good is None:
                raise CheckpointError(f"no checkpoint of {self.run_uri} verifies; last error: {err}") from err
        with tempfile.TemporaryDirectory(prefix="arm-resume-") as tmp:
            download(good.uri, tmp)
            step = load_checkpoint(tmp, **objects)["step"]
        log.info("rank %d resumed from step %d (%s)", self.rank, step, good.name)
        return step

    def start_tracking(self, tracking_uri: str | None, artifact_location: str | None) -> None:
        params = {
            **flatten(self.cfg),
            "ops_backend": ops.active_backend(self.device),
            "world_size": self.world,
            "steps_per_epoch": self.spe,
            "peak_lr": self.schedule.peak_lr,
        }
        cfg = self.cfg.tracking
        self.tracker = build_tracker(
            rank=self.rank,
            tracking_uri=tracking_uri,
            experiment=cfg.experiment_name or self.cfg.recipe,
            run_name=self.run_name,
            params=params,
            system_metrics=cfg.system_metrics,
            artifact_location=artifact_location,
        )
        if self.head_probe:
            self.tracker.log_metrics(self.head_probe, 0)

    # ---------------------------------------------------------------- per step
    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._maybe_hold(step)
        self._maybe_fail(step)
        every = self.cfg.tracking.log_every_n_steps
        if every and step % every == 0:
            self._log_progress(step, metrics)
        n = self.cfg.checkpoint.every_n_steps
        if n and step % n == 0 and step % self.spe != 0:
            self.report({**metrics, "step": step, "epoch": step / self.spe}, step)

    def _log_progress(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        global_batch = self.cfg.optim.effective_batch(self.world)
        img_s = (step - self._step_log) * global_batch / max(now - self._t_log, 1e-9)
        self._t_log, self._step_log = now, step
        self.tracker.log_metrics({"loss": metrics["loss"], "lr": metrics["lr"], "img_per_s": img_s}, step)
        if self.rank == 0:
            eta = (self.total_steps - step) * global_batch / max(img_s, 1e-9)
            log.info(
                "epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s ETA %s",
                (step - 1) // self.spe + 1,
                self.cfg.optim.epochs,
                step,
                self.total_steps,
                metrics["loss"],
                metrics["lr"],
                img_s,
                _duration(eta),
            )

    def _maybe_hold(self, step: int) -> None:
        if not self.hold:
            return
        at, release = self.hold.split(":", 1)
        if step != int(at) or Path(release).exists():
            return
        Path(f"{release}.held-{self.rank}").write_text(str(step))
        log.info("rank %d holds at step %d until %s exists (%s)", self.rank, step, release, HOLD_ENV)
        while not Path(release).exists():
            time.sleep(0.1)

    def _maybe_fail(self, step: int) -> None:
        if not self.fault or self.rank != self.world - 1:
            return
        at, marker = self.fault.split(":", 1)
        if step == int(at) and not Path(marker).exists():
            Path(marker).write_text(str(step))
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")

    # ---------------------------------------------------------------- reporting
    def report(self, metrics: dict[str, float], step: int) -> None:
        """ray.train.report on every rank; world rank 0 attaches the checkpoint."""
        epoch = step // self.spe
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                tmp,
                model=self.model,
                optimizer=self.optimizer,
                step=step,
                epoch=epoch,
                config=self.cfg.to_dict(),
                scaler=self.scaler,
                ema=self.ema,
                schedule=self.schedule,
            )
            name = free_checkpoint_name(self.run_uri, step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        self.tracker.set_tag(f"checkpoint.step_{step:09d}", self._checkpoint_uri(name))
        self.tracker.set_tag("checkpoint.latest", self._checkpoint_uri(name))
        self.tracker.prune_checkpoint_tags({f.uri for f in list_checkpoints(self.run_uri)})

    def _checkpoint_uri(self, name: str) -> str:
        return f"{self.run_uri.rstrip('/')}/{name}"

    # ---------------------------------------------------------------- evaluation
    def evaluate_epoch(self, epoch: int) -> dict[str, float]:
        """Finetune: top-1/top-5 of model and EMA on val. Pretrain: probes (`probes.PretrainMonitor`) + image grid."""
        last = epoch == self.cfg.optim.epochs
        if self.cfg.task == "finetune":
            if epoch % self.cfg.eval_every_n_epochs and not last:
                return {}
            return self._eval_classifier()
        out: dict[str, float] = {}
        if self.rank == 0 and _due(epoch, self.cfg.tracking.probe_every_n_epochs, last):
            with self.node_threads():
                out.update(self._probe())
        if self.rank == 0 and _due(epoch, self.cfg.tracking.vis_every_n_epochs, last):
            self._log_predictions(epoch)
        return out

    def node_threads(self):  # noqa: ANN201 (a context manager)
        """Rank 0's threads while it probes alone: those of every rank on its node (they wait for it meanwhile)."""
        local_ranks = ray.train.get_context().get_local_world_size()
        return threads_of(self.cfg.cluster.cpus_per_worker, local_ranks)

    def _val_batches(self, name: str = "val"):
        shard = ray.train.get_dataset_shard(name)
        return iter_batches(shard, self.cfg.optim.batch_size, self.device, drop_last=False, **self.stall_limits(name))

    def stall_limits(self, name: str) -> dict[str, Any]:
        """Data-outage watchdog settings for the dataset `name` (see data.watchdog)."""
        data = self.cfg.data
        source = f"the {name} dataset of {data.data_path}"
        return {"source": source, "stall_warn_s": data.stall_warn_s, "stall_timeout_s": data.stall_timeout_s}

    def _eval_classifier(self) -> dict[str, float]:
        dist_eval = self.cfg.data.dist_eval and self.world > 1
        if not dist_eval and self.rank != 0:
            return {}
        models = {"val": unwrap(self.model)} | ({"val_ema": self.ema.module} if self.ema is not None else {})
        results = evaluate(models, self._val_batches(), precision=self.cfg.precision, distributed=dist_eval)
        out = {f"{prefix}_{k}": stats[k] for prefix, stats in results.items() for k in ("acc1", "acc5", "loss")}
        out["val_best_acc1"] = max(out["val_acc1"], out.get("val_ema_acc1", out["val_acc1"]))  # ranks checkpoints
        return out

    def _probe(self) -> dict[str, float]:
        """kNN + linear probes, val loss, and (first call) their random-init / constant-predictor baselines."""
        out = self.monitor(unwrap(self.model), self._val_batches("probe"), self._val_batches("val"))
        warnings = self.monitor.warnings(out)
        for line in warnings:
            log.warning("pretraining monitor: %s", line)
        if warnings:  # the latest probe's verdict; cleared once every baseline is beaten
            self.tracker.set_tag("monitor.warning", "; ".join(warnings))
        elif self.monitor.baselines:
            self.tracker.set_tag("monitor.warning", "none: every probe beats its baseline")
        return out

    @torch.no_grad()
    def _log_predictions(self, epoch: int) -> None:
        """Grid rows: input, norm-pix target, prediction (drawn with batch-level statistics, see predict_images)."""
        model = unwrap(self.model)
        images = next(iter(self._val_batches()))["image"][:NUM_VIS_IMAGES]
        pred, target = model.predict_images(images)
        rows = torch.cat([_denormalize(images), _denormalize(target)])  # log_images draws `true` above `pred`
        self.tracker.log_images(_denormalize(pred), rows, f"pred_epoch{epoch:04d}")


def _duration(seconds: float) -> str:
    """Compact ETA: "3d04h", "2h05m" or "4m12s"."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _due(epoch: int, every: int, last: bool) -> bool:
    return bool(every) and (epoch % every == 0 or last)


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) ImageNet-normalised (the first C channels' statistics) -> [0, 1] RGB (B, 3, H, W) on CPU; one
    channel (a gray target, `model.target_chans=1`) is drawn as gray."""
    c = x.shape[1]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN[:c], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD[:c], device=x.device).view(1, -1, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).expand(-1, 3, -1, -1).cpu()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker)."""
    logging.basicConfig(level=os.environ.get("ARM_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    install_log_redaction()
    run = _Run(config)
    cpus = run.cfg.cluster.cpus_per_worker
    threads = set_torch_threads(cpus)  # Ray's CPU allotment, never the inherited $OMP_NUM_THREADS
    log.info("rank %d: %d torch threads (cluster.cpus_per_worker %s)", run.rank, threads, cpus)
    step = run.build()
    if step >= run.total_steps:
        log.info("run %s already reached its final step %d", run.run_name, step)
        return
    run.start_tracking(config.get("tracking_uri"), config.get("artifact_location"))
    run._t_log, run._step_log = time.perf_counter(), step
    cfg, train_shard = run.cfg, ray.train.get_dataset_shard("train")
    try:
        for epoch in range(step // run.spe, cfg.optim.epochs):
            remaining = (epoch + 1) * run.spe - step
            reprob = cfg.data.reprob if cfg.task == "finetune" else 0.0
            batches = iter_batches(
                train_shard,
                cfg.optim.batch_size,
                run.device,
                drop_last=True,
                reprob=reprob,
                **run.stall_limits("train"),
            )
            stats = train_one_epoch(
                run.task,
                batches,
                run.optimizer,
                run.schedule,
                start_step=step,
                max_steps=remaining,
                accum_iter=cfg.optim.accum_iter,
                clip_grad=cfg.optim.clip_grad,
                scaler=run.scaler,
                ema=run.ema,
                precision=cfg.precision,
                world_size=run.world,
                on_step=run.on_step,
            )
            if stats["steps"] < remaining:
                raise RuntimeError(f"train shard ran out after {stats['steps']} of {remaining} steps in epoch {epoch}")
            step += stats["steps"]
            metrics = {
                "loss": stats["loss"],
                "lr": run.schedule.lr_at(step - 1),
                "epoch": epoch + 1,
                "step": step,
                "img_per_s": stats["img_per_s"],
                "corrupt_records": sum_over_workers(batches.num_corrupt, run.device),  # all workers, this epoch
            } | run.evaluate_epoch(epoch + 1)
            run.tracker.log_metrics(
                {
                    f"epoch_{k}" if k in ("loss", "img_per_s") else k: v
                    for k, v in metrics.items()
                    if k not in ("step",)
                },
                step,
            )
            if run.rank == 0:
                log.info("epoch %d done: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
            run.report(metrics, step)
    except BaseException:
        run.tracker.finish("FAILED")
        raise
    run.tracker.finish()
