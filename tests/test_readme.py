"""README.md's commands work as written: every `python jobs/...` command of its code blocks (alone or after
`ray job submit ... --`) is parsed out of the README and run in its --dry-run form, and the config it prints must
say what the command's flags say. Nothing is hard-coded from the README, so it cannot drift from the flags again.

The commands run in one subprocess (one torch import; each job through runpy, as `python jobs/X.py` would run it),
with s3:// URIs and $VARIABLES rewritten to local temp paths and Ray made unreachable. The two jobs without
--dry-run run with their work stubbed: prepare_data.py (scan + shard writing) and pull_checkpoint.py (registry).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from arm_platform import cli, recipes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DRY_RUN_TASK = {"pretrain.py": "pretrain", "finetune.py": "finetune", "tune_finetune.py": "finetune"}
"""Jobs that take --dry-run, with the task whose recipe `--model` picks (launch.recipe_for)."""
FIXED_RECIPE = {"pretrain_huge.py": "pretrain_huge"}
STUBBED = ("prepare_data.py", "pull_checkpoint.py")
PYTHON = re.compile(r"^(?:.*/)?python[\d.]*$")


@dataclass(frozen=True)
class Command:
    line: str
    job: str
    args: tuple[str, ...]

    def flag(self, name: str) -> str | None:
        """Value of `--name value` / `--name=value` (the last one), else None."""
        value = None
        for i, arg in enumerate(self.args):
            if arg == f"--{name}" and i + 1 < len(self.args):
                value = self.args[i + 1]
            elif arg.startswith(f"--{name}="):
                value = arg.split("=", 1)[1]
        return value


def shell_lines(text: str) -> list[str]:
    """The lines of every non-Python fenced code block, backslash continuations joined."""
    lines = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang != "python":
            lines += body.replace("\\\n", " ").splitlines()
    return lines


def job_commands(text: str) -> list[Command]:
    """Every `[ray job submit ... --] <python> jobs/NAME.py ARGS` line of the README's code blocks."""
    commands = []
    for line in shell_lines(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell syntax shlex knows ($(...) with quotes inside is fine; this is a table)
            continue
        if tokens[:3] == ["ray", "job", "submit"]:
            assert "--" in tokens, f"ray job submit without `--` before the entrypoint: {line}"
            tokens = tokens[tokens.index("--") + 1 :]
        if len(tokens) >= 2 and PYTHON.match(tokens[0]) and tokens[1].startswith("jobs/"):
            commands.append(Command(line.strip(), tokens[1].removeprefix("jobs/"), tuple(tokens[2:])))
    return commands


README_TEXT = README.read_text()
COMMANDS = job_commands(README_TEXT)


def test_readme_has_the_cluster_and_smoke_commands():
    """The parser finds the commands (so the tests below test something): every job, on the cluster and locally."""
    jobs = {c.job for c in COMMANDS}
    assert {"prepare_data.py", "pretrain.py", "pretrain_huge.py", "finetune.py", "tune_finetune.py"} <= jobs
    assert "pull_checkpoint.py" in jobs
    submitted = [c for c in COMMANDS if c.line.startswith("ray job submit")]
    assert submitted and all(" --working-dir " in c.line for c in submitted)
    assert any(c.flag("model") == "arm_tiny_pz4" for c in COMMANDS), "no smoke form with the tiny recipe"


def test_named_job_scripts_recipes_and_models_exist():
    for script in set(re.findall(r"\bjobs/(\w+\.py)\b", README_TEXT)):
        assert (ROOT / "jobs" / script).is_file(), f"README names jobs/{script}, which does not exist"
    for job in {c.job for c in COMMANDS}:
        assert job in DRY_RUN_TASK or job in FIXED_RECIPE or job in STUBBED, f"add jobs/{job} to {__name__}"
    named = set(re.findall(r"\b(?:pretrain|finetune)_[a-z]+\b", README_TEXT)) - {"main_pretrain", "main_finetune"}
    assert named, "README names no recipe"
    for name in named:
        recipes.get(name)  # ValueError listing the valid ones
    for model in set(re.findall(r"\barm_[a-z]+_pz\d+(?:_pretrain)?\b", README_TEXT)):
        recipes.size_of(model)


def test_pulled_models_are_the_registered_ones():
    """Every models:/NAME@ALIAS the README loads was registered by one of its sweeps (--register NAME)."""
    registered = {c.flag("register") for c in COMMANDS} - {None}
    pulled = set(re.findall(r"models:/([\w.-]+)@champion", README_TEXT))
    assert pulled and pulled <= registered, (pulled, registered)


def test_finetune_checkpoints_come_from_a_readme_pretrain_run():
    """`CKPT=...` points into <output_dir>/<experiment_name>/ of a README pretrain command: the documented layout."""
    runs = {
        f"{c.flag('output_dir').rstrip('/')}/{c.flag('experiment_name')}/"
        for c in COMMANDS
        if c.job.startswith("pretrain") and c.flag("experiment_name")
    }
    assignments = [line.split("=", 1)[1] for line in shell_lines(README_TEXT) if re.match(r"^\w+=.*checkpoint_", line)]
    assert assignments
    for value in assignments:
        assert any(run in value for run in runs), f"{value} is not in a pretrain run of the README ({runs})"


def test_checkpoint_picks_find_the_newest_checkpoint_folder(tmp_path):
    """Each `CKPT=...` line, run by bash over a run folder as Ray leaves it (checkpoint folders next to Ray's
    checkpoint_manager_snapshot.json; `aws s3 ls` faked), gives the newest checkpoint folder."""
    names = ("checkpoint_000000032", "checkpoint_000000064", "checkpoint_manager_snapshot.json", "arm_run.json")
    listing = "".join(f"  PRE {n}/\n" if "." not in n else f"2026-01-01 00:00:00  9 {n}\n" for n in names)
    for command in COMMANDS:
        if command.job.startswith("pretrain") and not command.flag("output_dir").startswith("s3://"):
            run = tmp_path / command.flag("output_dir") / command.flag("experiment_name")
            for name in names:
                (run / name).mkdir(parents=True) if "." not in name else (run / name).write_text("{}")
    lines = [line for line in shell_lines(README_TEXT) if re.match(r"^\w+=.*checkpoint_", line)]
    for line in lines:
        var = line.split("=", 1)[0]
        script = f"aws() {{ printf '{listing}'; }}\n{line}\nprintf %s \"${var}\""
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
        assert out.stdout.endswith("/checkpoint_000000064"), (line, out.stdout)


def test_checkpoint_layout_matches_the_code():
    from arm_platform.train import checkpoint, integrity

    examples = re.findall(r"\bcheckpoint_\d+\b", README_TEXT)
    assert examples and all(integrity.CHECKPOINT_DIR.match(name) for name in examples), examples
    for name in (checkpoint.STATE_FILE, checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE, integrity.MANIFEST_FILE):
        assert f"`{name}`" in README_TEXT


def test_env_file_copies_every_setting_the_code_reads_and_no_secret():
    """The `.arm.env` line keeps every AWS_* / MLFLOW_* variable arm_platform reads, and no credential."""
    (line,) = [line for line in shell_lines(README_TEXT) if "> .arm.env" in line]
    copied = set(re.search(r"\^\(([\w|]+)\)=", line)[1].split("|"))
    read = set()
    for path in (ROOT / "arm_platform").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get\(|\[)\"((?:AWS|MLFLOW)_\w+)\"", path.read_text()))
    assert {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"} <= read <= copied, (read, copied)
    assert not copied & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"}


# ------------------------------------------------------------------------------------------------ running them
DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback, types
import arm_platform.launch, arm_platform.registry
from arm_platform.data import fashion_mnist, ingest

def no_ray():
    raise RuntimeError("a README command started Ray")

arm_platform.launch.init_ray = no_ray
calls = []
ingest.ingest_folder = lambda src, output, cfg: calls.append({"call": "ingest_folder", "src": src, "output": output})
fashion_mnist.prepare = lambda output, cfg, limit=None: calls.append({"call": "fashion_mnist", "output": output})
arm_platform.registry.resolve = lambda uri, tracking_uri=None: (
    calls.append({"call": "resolve", "uri": uri, "tracking_uri": tracking_uri})
    or types.SimpleNamespace(version="1", tags={})
)

def load_model(uri, dst_dir=None, tracking_uri=None):
    import torch
    calls.append({"call": "load_model", "uri": uri, "dst": dst_dir, "tracking_uri": tracking_uri})
    return torch.nn.Linear(2, 2)

arm_platform.registry.load_model = load_model
results = []
for script, argv in json.loads(sys.argv[1]):
    calls.clear()
    out, rc, error = io.StringIO(), 0, ""
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        rc, error = 1, traceback.format_exc()
    results.append({"rc": rc, "stdout": out.getvalue(), "error": error, "calls": list(calls)})
print(json.dumps(results))
"""


def local_args(command: Command, tmp: Path) -> list[str]:
    """The command's args with s3:// URIs and $VARIABLES as temp paths; --dry-run added where the job has it."""
    args = []
    for arg in command.args:
        if arg.startswith("s3://"):
            arg = str(tmp / "s3" / arg.removeprefix("s3://"))
        elif "$" in arg:
            arg = str(tmp / "vars" / re.sub(r"\W", "", arg))
        args.append(arg)
    return args + (["--dry-run"] if command.job not in STUBBED else [])


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> list[tuple[Command, list[str], dict]]:
    """(command, local args, result) of every README job command, all run in one subprocess (~10 s)."""
    tmp = tmp_path_factory.mktemp("readme")
    runs = [(c, local_args(c, tmp)) for c in COMMANDS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([(str(ROOT / "jobs" / c.job), a) for c, a in runs])],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    return [(c, a, r) for (c, a), r in zip(runs, results, strict=True)]


def _at(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _same(printed, given: str) -> bool:
    if isinstance(printed, bool):
        return str(printed).lower() == given.lower()
    if isinstance(printed, int | float):
        return float(printed) == float(given)
    return str(printed) == given


def _expected_recipe(command: Command) -> str:
    if command.job in FIXED_RECIPE:
        return FIXED_RECIPE[command.job]
    if command.flag("recipe"):
        return command.flag("recipe")
    model = command.flag("model")
    return f"{DRY_RUN_TASK[command.job]}_{recipes.size_of(model) if model else 'base'}"


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[f"{c.job}:{' '.join(c.args)[:60]}" for c in COMMANDS])
def test_readme_command_runs_and_prints_what_its_flags_say(ran, index):
    command, args, result = ran[index]
    assert result["rc"] == 0, f"{command.line}\n{result['error']}"
    if command.job == "prepare_data.py":
        (call,) = result["calls"]
        assert call["output"] == (
            args[args.index("--output") + 1] if "--output" in args else recipes.FASHION_MNIST_SHARDS
        )
        assert call.get("src") == command.flag("src")
        return
    if command.job == "pull_checkpoint.py":
        uri = args[0]
        assert [c["uri"] for c in result["calls"]] == [uri, uri]
        assert result["calls"][1]["dst"] == command.flag("dst") and f"pulled {uri} (version 1)" in result["stdout"]
        return
    cfg = json.loads(result["stdout"])  # nothing but the resolved config on stdout
    assert cfg["recipe"] == _expected_recipe(command)
    if command.flag("model"):
        assert cfg["model"]["name"] == command.flag("model")
    given = dict(zip(args, args[1:], strict=False))
    for flag, keys in cli.FLAG_KEYS.items():
        if f"--{flag}" in given:
            for key in keys:
                assert _same(_at(cfg, key), given[f"--{flag}"]), (command.line, key, _at(cfg, key))
    for override in (a for a in args if "=" in a and not a.startswith("-")):
        key, value = override.split("=", 1)
        assert _same(_at(cfg, key), value), (command.line, key)
