"""What running through Slurm costs: a real single-node Slurm (tests/slurm_fixture.py) is started,
then the same small workflow (tests/data/slurm_workflow: a CPU job, then a GPU job) runs once
locally and once through profiles/slurm. Prints the cluster setup time, both wall times, the
per-job overhead and the ratio. The overhead is Slurm scheduling, the in-job Snakemake start and
the executor's status polling (first check after slurm-init-seconds-before-status-checks, then
+10 s per check while nothing finished), so it is a fixed cost per job, not per second of work.

    run as root (slurmd needs it), after .ci/setup_slurm.sh:
    PYTHONPATH=. python benchmarks/bench_slurm.py [--init-seconds 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from slurm_fixture import LocalSlurm, missing_requirements  # noqa: E402
from test_slurm import DEFAULT_PROFILE, WORKFLOW, fitted_profile, load_profile, profile_partitions  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.monotonic()
    res = subprocess.run(["timeout", "300", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-seconds", type=int, default=2,
                    help="slurm-init-seconds-before-status-checks for the run (profile default: 40)")
    args = ap.parse_args()
    why = missing_requirements()
    if why:
        raise SystemExit(why)
    root = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    cluster = LocalSlurm(root / "cluster", partitions=profile_partitions(load_profile()), gpus=2)
    try:
        cluster.start()
        prof = fitted_profile(root / "profile", cluster)
        text = (prof / "config.yaml").read_text().replace(
            "slurm-init-seconds-before-status-checks: 2", f"slurm-init-seconds-before-status-checks: {args.init_seconds}")
        (prof / "config.yaml").write_text(text)
        snake = [sys.executable, "-m", "snakemake", "--workflow-profile", str(DEFAULT_PROFILE)]
        local_wd, slurm_wd = root / "local", root / "slurm"
        shutil.copytree(WORKFLOW, local_wd)
        shutil.copytree(WORKFLOW, slurm_wd)
        env = cluster.env()
        t_local = timed([*snake, "--cores", "2"], local_wd, env)
        t_slurm = timed([*snake, "--profile", str(prof)], slurm_wd, env)
        jobs = 2
        print(f"machine: {cluster.cpus} CPUs (shared with other users while measured)")
        print(f"slurm cluster setup (munged + slurmctld + slurmd, node idle): {cluster.setup_seconds:.2f} s")
        print(f"workflow, {jobs} jobs, local:          {t_local:6.1f} s")
        print(f"workflow, {jobs} jobs, through Slurm:  {t_slurm:6.1f} s  "
              f"(first status check after {args.init_seconds} s)")
        print(f"overhead per job: {(t_slurm - t_local) / jobs:.1f} s; ratio slurm/local: {t_slurm / t_local:.1f}x")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
