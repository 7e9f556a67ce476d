"""Two ``snakemake`` runs on the same outputs at once (issue 19, fault tests): the second is refused by
Snakemake's lock with its message, and touches nothing.

The first run is frozen (SIGSTOP) as soon as it holds the lock, so the test does not depend on how long its
jobs take; it is killed afterwards (its process group: the job it started too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import REPO, TEST_CORPUS, run_snakemake, subprocess_env


def test_a_second_run_on_the_same_outputs_is_refused_by_the_lock(tmp_path):
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cfg["corpus"]["dir"] = str(TEST_CORPUS)
    cfg["output_dir"] = str(tmp_path / "out")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
           "--configfile", str(cfgfile)]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    locks = tmp_path / ".snakemake" / "locks"
    try:
        t0 = time.monotonic()
        while not (locks.is_dir() and any(locks.iterdir())):
            assert first.poll() is None, "the first run ended before it took the lock"
            assert time.monotonic() - t0 < 120, "the first run never took the lock"
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)  # holds the lock, does nothing more
        before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
        second = run_snakemake(tmp_path, configfile=cfgfile, check=False, timeout=300)
        after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGCONT)
        first.wait(30)
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert "Directory cannot be locked" in out, out[-2000:]
    assert "--unlock" in out  # Snakemake says how to clear a stale lock
    assert after == before  # the refused run wrote nothing
