"""Each job script imports, names an existing recipe and prints the resolved config with --dry-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_JOBS = {
    "pretrain.py": ("pretrain_base", "arm_base_pz16"),
    "pretrain_huge.py": ("pretrain_huge", "arm_huge_pz16"),
    "finetune.py": ("finetune_base", "arm_base_pz16"),
}


def _dry_run(job: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / job), "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("job", sorted(TRAIN_JOBS))
def test_job_dry_run_prints_its_recipe(job):
    cfg = _dry_run(job)
    assert (cfg["recipe"], cfg["model"]["name"]) == TRAIN_JOBS[job]


def test_model_flag_selects_the_size_recipe_and_overrides_apply():
    cfg = _dry_run("finetune.py", "--model", "arm_tiny_pz4", "--epochs", "7", "cluster.num_workers=1")
    assert cfg["recipe"] == "finetune_tiny" and cfg["optim"]["epochs"] == 7 and cfg["cluster"]["num_workers"] == 1


def test_huge_job_uses_accumulation_to_the_official_batch_and_grad_checkpointing():
    cfg = _dry_run("pretrain_huge.py")
    optim = cfg["optim"]
    assert optim["batch_size"] * optim["accum_iter"] * cfg["cluster"]["num_workers"] == 2048
    assert cfg["model"]["grad_checkpointing"] is True


@pytest.mark.parametrize("job", ["pretrain.py", "pretrain_huge.py", "finetune.py", "demo.py"])
def test_jobs_are_thin(job):
    assert len((ROOT / "jobs" / job).read_text().splitlines()) <= 25
