"""Checkpoint integrity: manifests written last, truncated / altered / incomplete checkpoints refused naming the file,
and run-folder repair (quarantine + Ray snapshot rewrite) on a local folder and on S3 (moto)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from arm_platform import storage
from arm_platform.train import integrity
from arm_platform.train.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint, save_checkpoint
from arm_platform.train.integrity import CheckpointError


def _save(folder, model, step):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(folder, model=model, optimizer=opt, step=step, epoch=0, config={"step": step})


def _ray_snapshot(names):
    """The fields of Ray Train V2's checkpoint_manager_snapshot.json that repair_run edits."""
    results = [{"checkpoint_dir_name": n, "metrics": {"step": integrity.checkpoint_step(n)}} for n in names]
    return {
        "ray_version": "x",
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(1, len(names) + 1)),
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(names),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": list(names),
    }


def _make_run(root: str, model, steps=(4, 6, 8)) -> list[str]:
    """A run folder (local path or s3:// URI) with one checkpoint per step and a Ray snapshot naming them all."""
    names = [integrity.checkpoint_dir_name(s) for s in steps]
    for step, name in zip(steps, names, strict=True):
        local = Path(f"/tmp/arm-integrity-{step}") if storage.is_s3(root) else Path(root) / name
        shutil.rmtree(local, ignore_errors=True)
        _save(local, model, step)
        if storage.is_s3(root):
            for f in local.iterdir():
                storage.write_bytes_atomic(storage.join(root, name, f.name), f.read_bytes())
            shutil.rmtree(local)
    storage.write_bytes_atomic(
        storage.join(root, integrity.RAY_SNAPSHOT_FILE), json.dumps(_ray_snapshot(names)).encode()
    )
    return names


def _truncate(uri: str) -> None:
    data = storage.read_bytes(uri)
    storage.write_bytes_atomic(uri, data[: len(data) // 2])


def test_manifest_is_written_last_and_verifies(tmp_path, finetune_model):
    folder = _save(tmp_path / "ck", finetune_model, 3)
    manifest = integrity.verify_checkpoint(str(folder))
    assert set(manifest["files"]) == {STATE_FILE, MODEL_FILE, "config.json"}
    assert manifest["files"][STATE_FILE]["size"] == (folder / STATE_FILE).stat().st_size
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest", "garbled_manifest"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, finetune_model, damage):
    folder = _save(tmp_path / "ck", finetune_model, 3)
    state = folder / STATE_FILE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:1000])
        match, shallow = r"state\.pt has 1000 bytes, manifest\.json says \d+ \(truncated", True
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        match, shallow = r"state\.pt does not match its sha256", False
    elif damage == "delete":
        state.unlink()
        match, shallow = r"state\.pt is missing", True
    elif damage == "no_manifest":
        (folder / integrity.MANIFEST_FILE).unlink()
        match, shallow = r"has no manifest\.json: it was not completely written", True
    else:
        (folder / integrity.MANIFEST_FILE).write_text("{not json")
        match, shallow = r"manifest\.json is malformed", True
    with pytest.raises(CheckpointError, match=match):
        integrity.verify_checkpoint(str(folder), deep=True)
    if shallow:
        with pytest.raises(CheckpointError, match=match):
            integrity.verify_checkpoint(str(folder), deep=False)
    with pytest.raises(CheckpointError, match=str(folder)):
        load_checkpoint(folder, model=finetune_model)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_repair_quarantines_bad_checkpoints_and_rewrites_ray_snapshot(where, tmp_path, finetune_model, request):
    root = str(tmp_path / "run") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/runs/r1"
    names = _make_run(root, finetune_model)
    assert integrity.repair_run(root) == []  # healthy: untouched
    _truncate(storage.join(root, names[-1], STATE_FILE))

    skipped = integrity.repair_run(root)

    assert [name for name, _ in skipped] == [names[-1]]
    assert "state.pt has" in skipped[0][1]
    assert [f.name for f in integrity.list_checkpoints(root)] == names[:2]
    assert storage.exists(storage.join(root, f"corrupt-{names[-1]}", STATE_FILE))  # kept for inspection
    snap = json.loads(storage.read_bytes(storage.join(root, integrity.RAY_SNAPSHOT_FILE)))
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == names[:2]
    assert snap["checkpoint_report_indices"] == [1, 2]
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == names[1]
    assert snap["failed_validation_checkpoint_dir_names"] == names[:2]
    found, rejected = integrity.newest_verified(root)
    assert found.name == names[1] and rejected == []
    assert integrity.free_checkpoint_name(root, 8) == names[-1]  # the name is free again
    assert integrity.free_checkpoint_name(root, 6) == names[1] + "-r1"


def test_repair_of_a_run_whose_every_checkpoint_is_bad_starts_from_scratch(tmp_path, finetune_model):
    root = str(tmp_path / "run")
    names = _make_run(root, finetune_model, steps=(2,))
    (Path(root) / names[0] / integrity.MANIFEST_FILE).unlink()  # died before the manifest was written
    assert [n for n, _ in integrity.repair_run(root)] == names
    snap = json.loads((Path(root) / integrity.RAY_SNAPSHOT_FILE).read_text())
    assert snap["checkpoint_results"] == [] and snap["latest_checkpoint_result"] is None


def test_retry_names_sort_after_their_step():
    names = ["checkpoint_000000008-r1", "checkpoint_000000010", "checkpoint_000000008", "corrupt-checkpoint_000000009"]
    assert [integrity.checkpoint_step(n) for n in names] == [8, 10, 8, None]
    found = sorted((integrity.Found(n, n) for n in names[:3]), key=lambda f: f.order)
    assert [f.name for f in found] == ["checkpoint_000000008", "checkpoint_000000008-r1", "checkpoint_000000010"]
