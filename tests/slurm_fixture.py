"""A real, single-node Slurm cluster started in a temporary directory, for tests.

``LocalSlurm(root, partitions, gpus).start()`` starts ``munged`` (as user munge, with its own key
and socket), ``slurmctld -i`` and ``slurmd`` with a generated ``slurm.conf`` under ``root``, waits
until ``sinfo`` (always under ``timeout``: it blocks while slurmctld is down) reports the node
idle, and returns. Nothing under /etc or /run is used or changed, so several clusters can run side
by side. ``env()`` is the environment under which clients (``sbatch``, ``squeue``, ``snakemake
--profile profiles/slurm``) talk to this cluster: ``SLURM_CONF`` plus client shims first on
``PATH`` (see ``_write_client_shims``). ``stop()`` ends the daemons by the PIDs they were started
with (never by name), slurmd first, and waits for them; the daemons also get SIGTERM if the test
process dies without calling ``stop()`` (PR_SET_PDEATHSIG).

The cluster: one node named ``hostname -s`` at 127.0.0.1 with ``nproc`` CPUs, RealMemory at most
half the available memory, ``gpus`` fake GPUs (gres.conf ``AutoDetect=off`` and ``Name=gpu
File=/dev/null`` (/dev/zero, ...): a GPU needs a real character device or the node goes INVAL;
``--gpus=N`` jobs then run with ``CUDA_VISIBLE_DEVICES=0,..,N-1``), the given partitions on that
node (the first is the default), ``DefMemPerCPU`` (else every job takes the whole node's memory),
``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``, no accounting database
(``accounting_storage/none``: ``sacct`` does not work, so clients use the Slurm executor plugin's
``squeue`` status mode, which it honours only when ``MinJobAge`` >= 3 x its first status-check
delay: ``MinJobAge=300``). The daemons listen on free TCP ports and talk over 127.0.0.1 only.

Requires root (slurmd must run as root) and Debian's ``slurm-wlm`` + ``munge`` packages
(``.ci/setup_slurm.sh``); ``missing_requirements()`` says what is absent so tests can skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "sacct", "sacctmgr", "sshare")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "srun")
# Character devices standing in for GPUs (gres.conf needs a real device file per GPU).
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


def missing_requirements() -> str | None:
    """Why a local Slurm cannot be started here (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm/munge binaries not installed ({', '.join(missing)} missing); "
            "run .ci/setup_slurm.sh (apt-get install slurm-wlm munge) to enable the Slurm tests"
        )
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (munge package incomplete)"
    return None


try:  # loaded here: the pre-exec hook in the child must not import or load libraries
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc
    _PRCTL = None


def _set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the calling process gets ``sig`` when its parent exits (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, int(sig), 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


class LocalSlurm:
    """One single-node Slurm cluster rooted at ``root`` (see module docstring)."""

    def __init__(self, root: Path, partitions: tuple[str, ...] = ("debug",), gpus: int = 1):
        """``partitions``: names of the partitions (all on the one node; the first is the default);
        ``gpus``: number of fake GPUs on the node (at most 4)."""
        if not 1 <= gpus <= len(FAKE_GPU_FILES):
            raise ValueError(f"gpus must be 1..{len(FAKE_GPU_FILES)}")
        self.root = Path(root).resolve()
        self.partitions = tuple(dict.fromkeys(partitions))
        self.gpus = gpus
        self.node = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0)) or 1  # what `nproc` says
        # Well below free memory: the node must never be marked INVAL for "low RealMemory".
        self.real_memory_mb = max(512, min(_available_memory_mb() // 2, 16384))
        self.ctld_port = _free_port()
        self.slurmd_port = _free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = _free_port()
        self.procs: dict[str, int] = {}
        self._popen: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        # munged (user munge) must reach its files: they live in their own world-traversable temp
        # dir, since ``root`` may sit below a private (0700) directory such as pytest's tmp_path.
        self.munge_dir: Path | None = None
        self.munge_socket: Path | None = None
        self.setup_seconds: float | None = None

    # ------------------------------------------------------------------ configuration
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # Non-root munge needs to own its key and socket directory.
        munge = pwd.getpwnam("munge")
        mdir = self.munge_dir = Path(tempfile.mkdtemp(prefix="rerankflow-munge-"))
        self.munge_socket = mdir / "munge.socket"
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o755)
        key = mdir / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True,
                       capture_output=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)

        per_cpu = max(64, self.real_memory_mb // max(self.cpus, 1) // 2)
        self.conf.write_text(f"""\
# generated by tests/slurm_fixture.py
ClusterName=rerankflowtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# the plugin's squeue status mode needs finished jobs visible for >= 3 x its first check delay
MinJobAge=300
DefMemPerCPU={per_cpu}
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
""" + "".join(
            f"PartitionName={p} Nodes={self.node} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP\n"
            for i, p in enumerate(self.partitions)))
        # A fake GPU must be backed by a real character device, else the node goes INVAL.
        self._write_client_shims()
        (r / "gres.conf").write_text("AutoDetect=off\n" + "".join(
            f"Name=gpu File={f}\n" for f in FAKE_GPU_FILES[: self.gpus]))

    def _write_client_shims(self) -> None:
        """Client commands that find this cluster's slurm.conf wherever they are called from.

        SLURM_CONF alone is not enough: inside a job, snakemake-executor-plugin-slurm-jobstep
        removes every SLURM_* variable (except the job's identity) from the environment of its
        ``srun``, which then looks for /etc/slurm/slurm.conf. A real cluster has its conf there; this
        one must not touch /etc, so PATH (which the jobstep keeps) leads to these shims instead.
        """
        self.bin.mkdir(parents=True, exist_ok=True)
        for name in CLIENTS:
            real = shutil.which(name)
            if real is None:
                continue
            shim = self.bin / name
            shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{real}" "$@"\n')
            shim.chmod(0o755)

    def env(self, base: dict | None = None) -> dict:
        """Environment for Slurm clients (and everything they start) talking to this cluster:
        SLURM_CONF, and the client shims first on PATH."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        pw = pwd.getpwnam(user) if user is not None else None

        def pre():  # runs in the child before exec
            if pw is not None:
                os.setgid(pw.pw_gid)
                os.initgroups(pw.pw_name, pw.pw_gid)
                os.setuid(pw.pw_uid)
            # die with the test process even if it is killed before stop() runs (set after the
            # uid change, which would clear it)
            _set_parent_death_signal(signal.SIGTERM)

        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                preexec_fn=pre, start_new_session=True)
        log.close()
        self.procs[name] = proc.pid
        self._popen[name] = proc

    def _check_alive(self) -> None:
        for name, proc in self._popen.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} during startup:\n{self.logs_tail()}")

    def logs_tail(self, n: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def sinfo_state(self) -> str:
        """Node state as sinfo reports it (always under `timeout`: sinfo blocks if slurmctld is down)."""
        res = subprocess.run(["timeout", "5", "sinfo", "-h", "-N", "-o", "%t"], env=self.env(),
                             capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else f"<sinfo rc={res.returncode}: {res.stderr.strip()}>"

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        t0 = time.monotonic()
        self._write_config()
        mdir = self.munge_dir
        # -F: stay in the foreground, so the PID we hold is the daemon's.
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}",
                               f"--key-file={mdir / 'munge.key'}",
                               f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={mdir / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}"], user="munge")
        deadline = time.monotonic() + timeout
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create its socket\n{self.logs_tail()}")
            time.sleep(0.05)
        # -D: foreground; -i: ignore saved state (fresh cluster every time).
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        time.sleep(0.3)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        state = ""
        while True:
            self._check_alive()
            state = self.sinfo_state()
            if state and set(state.split()) == {"idle"}:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not idle after {timeout} s (state {state!r})\n{self.logs_tail()}")
            time.sleep(0.2)
        self.setup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the daemons by PID (slurmd first), escalate to SIGKILL after 10 s."""
        popen = self._popen
        for name in ("slurmd", "slurmctld", "munged"):
            proc = popen.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._stop_leftover_job_processes()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _stop_leftover_job_processes(self) -> None:
        """slurmstepd processes of jobs still running when slurmd stopped would outlive it: end
        those that belong to this cluster (their command line or environment names our conf)."""
        conf = str(self.conf).encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes()
                if not cmd.startswith(b"slurmstepd"):
                    continue
                environ = (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if conf in environ or conf in cmd:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
