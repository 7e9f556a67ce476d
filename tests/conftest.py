"""Shared fixtures. Every test runs offline: an accidental model download fails loudly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TEST_CORPUS = REPO / "tests" / "data" / "corpus"


def scifact_dir() -> Path:
    """The real SciFact BEIR folder: $RERANKFLOW_SCIFACT, else ../shared/data/scifact beside the repo."""
    return Path(os.environ.get("RERANKFLOW_SCIFACT", REPO.parent / "shared" / "data" / "scifact"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def scifact() -> Path:
    d = scifact_dir()
    if not (d / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {d} (set RERANKFLOW_SCIFACT to a BEIR SciFact folder)")
    return d


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run the repo's workflow with ``workdir`` as working directory (outputs, logs, .snakemake there)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2"]
    cmd += list(args)
    if configfile is not None:  # last: --configfile takes several values and would swallow targets
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def process_gone(pid: int, timeout: float = 15.0) -> bool:
    """True once ``pid`` has exited (or is a zombie) within ``timeout`` seconds."""
    import time

    from rerankflow.deploy.process import proc_stat

    t0 = time.time()
    while time.time() - t0 < timeout:
        st = proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False
