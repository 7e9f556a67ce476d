"""Processes and ports of the built-in server: a free port, a detached start, and the identity
check that makes stopping safe (command line and start time from ``/proc``, so a recycled pid is
never signalled)."""

from __future__ import annotations

import datetime as _dt
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second (``...+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def client_host(host: str) -> str:
    """Host a client uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def free_port(host: str) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((client_host(host).strip("[]"), port)) == 0


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[19])


def process_is_ours(pid: int, record: dict) -> tuple[bool, str]:
    """Whether ``pid`` is still the server recorded in ``record`` (command line and start time)."""
    if not Path("/proc").is_dir():
        raise RuntimeError("stopping needs /proc (Linux) to verify the process before killing it")
    stat = proc_stat(pid)
    cmd = proc_cmdline(pid)
    if stat is None or cmd is None:
        return False, "not running"
    if stat[0] in ("Z", "X"):
        return False, "exited (zombie)"
    if record.get("proc_start_ticks") is not None and stat[1] != record["proc_start_ticks"]:
        return False, "pid now belongs to another process (different start time)"
    if cmd != record.get("cmdline"):
        return False, f"pid now runs something else: {' '.join(cmd)[:200]}"
    return True, "running"


def terminate(pid: int, record: dict, timeout_s: float) -> str:
    """SIGTERM (graceful), then SIGKILL after ``timeout_s``; re-verifies identity before SIGKILL."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ours, _ = process_is_ours(pid, record)
        if not ours:
            return "stopped"
        time.sleep(0.1)
    ours, _ = process_is_ours(pid, record)
    if ours:
        os.kill(pid, signal.SIGKILL)
        return "killed"
    return "stopped"


def package_root() -> str:
    """The folder that holds the ``rerankflow`` package (put on the child's PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


def start_detached(cmd: list[str], log_file: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new session (it outlives this process), output appended to ``log_file``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_file, "ab") as fh:
        fh.write(f"\n===== {now_utc()} starting: {' '.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env, cwd=os.getcwd(),
        )
