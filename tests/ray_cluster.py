"""A private local Ray head for tests: `ray start --head --block` on loopback in its own process group and temp dir.

Stopping it touches only its own processes (`ray stop` would kill every Ray instance on the machine). RAY_ADDRESS is
set in the head's environment, so every worker's state-API client (Ray Train V2's placement-group cleaner) finds this
cluster even when other Ray instances run on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class LocalHead:
    proc: subprocess.Popen
    gcs_address: str
    dashboard_address: str
    temp_dir: Path
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int, log_path: Path, timeout_s: float = 240) -> LocalHead:
    """Start the head and wait until its jobs API answers (bounded)."""
    port, dashboard = free_port(), free_port()
    temp_dir = Path(f"/tmp/ray_t{port}")  # short: Ray's socket paths must fit in 107 bytes
    gcs = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": gcs}  # fmt: skip
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--port", str(port), "--dashboard-port",
           str(dashboard), "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--node-ip-address",
           "127.0.0.1", "--temp-dir", str(temp_dir), "--disable-usage-stats",
           # fixed-default ports other Ray instances on this machine may hold (the job agent would fail to bind)
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port())]  # fmt: skip
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    head = LocalHead(proc, gcs, f"http://127.0.0.1:{dashboard}", temp_dir, env)
    try:
        _wait_for_jobs_api(head, timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_for_jobs_api(head: LocalHead, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{head.dashboard_address}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard {head.dashboard_address} not up after {timeout_s} s")


def stop_head(head: LocalHead) -> None:
    """SIGTERM the head's process group (SIGKILL after 30 s), then kill any leftover process of its temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.proc.pid, sig)
            head.proc.wait(timeout=wait_s)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in _pids_mentioning(str(head.temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def connected_head(num_cpus: int, log_path: Path) -> Iterator[LocalHead]:
    """This process connected to a private head (started now, stopped and disconnected on exit)."""
    import ray

    head = start_head(num_cpus=num_cpus, log_path=log_path)
    try:
        ray.init(address=head.gcs_address, configure_logging=False)
        yield head
    finally:
        ray.shutdown()
        stop_head(head)
