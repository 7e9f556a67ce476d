"""profiles/slurm against a real Slurm: slurmctld + slurmd + munged started by the fixture.

The cluster (tests/slurm_fixture.py) is one node with this machine's CPUs, two fake GPUs and the
two partitions that profiles/slurm names. Workflows run through
``snakemake --profile <profiles/slurm, adapted> --workflow-profile profiles/default`` exactly as a
user at the repository root gets them. The profile is the committed one with only what a 2-core
test node cannot satisfy scaled down (cpus_per_gpu, mem_mb) and a short first status check
(``test_profile``); everything else (executor, partitions, GPU counts, status mode, rerun
triggers) is tested as committed.

Skips (with the reason) when the Slurm/munge binaries are absent: `.ci/setup_slurm.sh` installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from slurm_fixture import LocalSlurm, missing_requirements  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
DEFAULT_PROFILE = REPO / "profiles" / "default"
WORKFLOW = Path(__file__).parents[1] / "data" / "slurm_workflow"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
GPU_RULES = ("prep", "finetune", "evaluate", "export_onnx", "export_tensorrt")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")

_missing = missing_requirements()
needs_slurm = pytest.mark.skipif(_missing is not None, reason=_missing or "")


def load_profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def profile_partitions(profile: dict) -> tuple[str, ...]:
    """Partitions the profile submits to; the default-resources one first (the cluster default)."""
    parts = [profile.get("default-resources", {}).get("slurm_partition", "debug")]
    parts += [r["slurm_partition"] for r in profile.get("set-resources", {}).values()
              if "slurm_partition" in r]
    return tuple(dict.fromkeys(parts))


def fitted_profile(dest: Path, cluster: LocalSlurm, **set_resources_overrides) -> Path:
    """The committed profile, fitted to the test node: per-job cpus_per_gpu/mem_mb capped to what
    the node has, first status check after 2 s (MinJobAge=300 >= 3 x 2 keeps squeue mode).
    ``set_resources_overrides``: {rule: {resource: value}} applied on top (e.g. more GPUs)."""
    prof = load_profile()
    mem_cap = max(200, cluster.real_memory_mb // (2 * cluster.cpus))
    prof["default-resources"]["mem_mb"] = min(prof["default-resources"]["mem_mb"], mem_cap)
    for res in prof["set-resources"].values():
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], mem_cap)
    for rule, res in set_resources_overrides.items():
        prof["set-resources"].setdefault(rule, {}).update(res)
    prof["slurm-init-seconds-before-status-checks"] = 2
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest




def run_snakemake(args: list[str], cwd: Path, env: dict, limit_s: int) -> subprocess.CompletedProcess:
    """snakemake under `timeout` (the plugin can wait forever on a broken status query: rc 124
    then says "hung" instead of a stuck CI job)."""
    return subprocess.run(["timeout", "-k", "10", str(limit_s), *SNAKEMAKE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def submitted_jobs(output: str) -> dict[str, str]:
    """{slurm job id: slurm log path} from Snakemake's output."""
    return {m.group(1): m.group(2) for m in SUBMITTED.finditer(output)}


def scontrol_job(cluster: LocalSlurm, jobid: str) -> dict[str, str]:
    res = subprocess.run(["timeout", "10", "scontrol", "show", "job", "-o", jobid], env=cluster.env(),
                         capture_output=True, text=True, check=True)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    c = LocalSlurm(root / "cluster", partitions=profile_partitions(load_profile()), gpus=2)
    try:
        c.start(timeout=60)
        print(f"\nlocal Slurm up in {c.setup_seconds:.2f} s ({c.node}, {c.cpus} CPUs, "
              f"{c.real_memory_mb} MB, partitions {c.partitions})", file=sys.stderr)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def workflow_run(cluster, tmp_path_factory):
    """The small workflow (CPU rule -> GPU rule) run once through the profile."""
    root = tmp_path_factory.mktemp("slurm_wf")
    wd = root / "wf"
    shutil.copytree(WORKFLOW, wd)
    prof = fitted_profile(root / "profile", cluster)
    env = cluster.env()
    env["RERANKFLOW_SLURM_TEST_MARKER"] = "from-the-submit-host"
    t0 = time.monotonic()
    res = run_snakemake(["--profile", str(prof), "--workflow-profile", str(DEFAULT_PROFILE)], wd, env, 240)
    return {"wd": wd, "profile": prof, "env": env, "res": res, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------- static checks (no Slurm needed)

def test_profile_sends_gpu_rules_to_gpus_with_deliberate_rerun_triggers():
    prof = load_profile()
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"
    # editing code must not silently retrain on the GPU
    assert "code" not in prof["rerun-triggers"] and "params" in prof["rerun-triggers"]
    default_prof = yaml.safe_load((DEFAULT_PROFILE / "config.yaml").read_text())
    assert default_prof["rerun-triggers"] == prof["rerun-triggers"]
    # profiles/default is loaded as the workflow profile on top of --profile and wins top-level keys:
    # it must not carry resources or an executor, or the Slurm profile's would be replaced.
    assert not {"executor", "default-resources", "set-resources", "jobs"} & set(default_prof)
    for key in ("runtime", "mem_mb", "slurm_partition"):
        assert key in prof["default-resources"]
    for rule in GPU_RULES:
        res = prof["set-resources"][rule]
        assert res["gpu"] >= 1 and res["cpus_per_gpu"] >= 1 and res["mem_mb"] > 0 and res["runtime"] > 0


# ---------------------------------------------------------------- against the real Slurm

@needs_slurm
def test_every_job_runs_through_slurm_and_gpu_job_sees_its_gpu(cluster, workflow_run):
    res, wd = workflow_run["res"], workflow_run["wd"]
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"snakemake failed (rc {res.returncode}):\n{out[-6000:]}\n{cluster.logs_tail()}"
    jobs = submitted_jobs(out)
    assert len(jobs) == 2, out  # write_corpus + finetune; `all` is a localrule

    corpus = read_env_file(wd / "results" / "corpus.txt")
    gpu = read_env_file(wd / "results" / "finetune.txt")
    # each rule ran inside one of the submitted Slurm jobs, in the partition the profile names
    assert corpus["SLURM_JOB_ID"] in jobs and gpu["SLURM_JOB_ID"] in jobs
    assert corpus["SLURM_JOB_ID"] != gpu["SLURM_JOB_ID"]
    prof = load_profile()
    assert corpus["SLURM_JOB_PARTITION"] == prof["default-resources"]["slurm_partition"]
    assert gpu["SLURM_JOB_PARTITION"] == prof["set-resources"]["finetune"]["slurm_partition"]
    # the GPU rule got its GPU (and only it), the CPU rule none
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0"
    assert corpus["CUDA_VISIBLE_DEVICES"] == ""
    # the submit environment reaches the job (PYTHONPATH, HF_HUB_OFFLINE, ... travel the same way)
    assert gpu["SUBMIT_ENV_MARKER"] == "from-the-submit-host"

    # what Slurm recorded for the jobs: the GPU request, partitions, success
    gjob = scontrol_job(cluster, gpu["SLURM_JOB_ID"])
    cjob = scontrol_job(cluster, corpus["SLURM_JOB_ID"])
    assert re.search(r"gpu:1\b", gjob.get("TresPerJob", "")), gjob
    assert "gpu" not in cjob.get("TresPerJob", "") and "gres/gpu" not in cjob.get("AllocTRES", ""), cjob
    assert gjob["JobState"] == cjob["JobState"] == "COMPLETED"
    assert gjob["Comment"] == "rule_finetune" and cjob["Comment"] == "rule_write_corpus"
    # per-job Slurm logs land under .snakemake/slurm_logs/rule_<rule>/<jobid>.log (kept: profile)
    for jobid, log in jobs.items():
        log = Path(log)
        assert log.is_file() and log.name == f"{jobid}.log"
        assert log.parent.parent == wd / ".snakemake" / "slurm_logs"
        assert "Finished jobid" in log.read_text()
    print(f"\nworkflow through Slurm: {workflow_run['seconds']:.1f} s", file=sys.stderr)


@needs_slurm
def test_failed_slurm_job_is_reported_as_failed_not_hung(cluster, workflow_run):
    wd = workflow_run["wd"]
    t0 = time.monotonic()
    res = run_snakemake(["--profile", str(workflow_run["profile"]), "--workflow-profile", str(DEFAULT_PROFILE),
                         "results/never.txt"], wd, workflow_run["env"], 180)
    out = res.stdout + res.stderr
    assert res.returncode not in (0, 124, 137), f"rc {res.returncode} (124/137: hung)\n{out[-4000:]}"
    jobs = submitted_jobs(out)
    assert len(jobs) == 1, out  # only `fail`: write_corpus is up to date
    (jobid, log), = jobs.items()
    assert "Error in rule fail" in out
    assert f"SLURM-job '{jobid}' failed" in out
    assert scontrol_job(cluster, jobid)["JobState"] == "FAILED"
    assert "this rule fails on purpose" in (wd / "logs" / "fail.log").read_text()
    assert Path(log).is_file()  # the failed job's Slurm log is kept
    assert not (wd / "results" / "never.txt").exists()
    print(f"\nfailure reported after {time.monotonic() - t0:.1f} s", file=sys.stderr)


@needs_slurm
def test_finetune_given_two_gpus_sees_two(cluster, workflow_run, tmp_path):
    """Multi-GPU: raising the profile's `gpu` for finetune is all it takes; the job sees N devices
    in CUDA_VISIBLE_DEVICES (stage 2 starts one torchrun process per visible device)."""
    wd = workflow_run["wd"]
    prof = fitted_profile(tmp_path / "profile2", cluster, finetune={"gpu": 2})
    res = run_snakemake(["--profile", str(prof), "--workflow-profile", str(DEFAULT_PROFILE),
                         "--forcerun", "finetune", "results/finetune.txt"], wd, workflow_run["env"], 180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    jobs = submitted_jobs(out)
    assert len(jobs) == 1, out
    gpu = read_env_file(wd / "results" / "finetune.txt")
    assert gpu["SLURM_JOB_ID"] in jobs
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert re.search(r"gpu:2\b", scontrol_job(cluster, gpu["SLURM_JOB_ID"]).get("TresPerJob", ""))


# ---------------------------------------------------------------- the real workflow

SNAKEFILE = REPO / "Snakefile"
TINY = REPO / "tests" / "config" / "tiny.yaml"
# stage rule file -> the GPU rules of profiles/slurm it must define
STAGE_GPU_RULES = {"prep.smk": ("prep",), "finetune.smk": ("finetune",), "eval.smk": ("evaluate",),
                   "export.smk": ("export_onnx", "export_tensorrt")}
needs_workflow = pytest.mark.skipif(not (SNAKEFILE.is_file() and TINY.is_file()),
                                    reason="the workflow (Snakefile, tests/config/tiny.yaml) is not in this checkout")


def workflow_env(base: dict) -> dict:
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def tiny_overlay(dest: Path) -> Path:
    """tiny.yaml's relative paths made absolute/isolated so the run can live in a temp dir."""
    tiny = yaml.safe_load(TINY.read_text())
    out = dest / "out"
    overlay = {"output_dir": str(out)}
    if tiny.get("corpus", {}).get("dir"):
        overlay["corpus"] = {"dir": str(REPO / tiny["corpus"]["dir"])}
    overlay["retrieval"] = {"cache_dir": str(out / "cache" / "embeddings")}
    path = dest / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def job_stats(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table: {rule: count}."""
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+(\d+)", output, re.S)
    assert m, output[-3000:]
    return {line.split()[0]: int(line.split()[1]) for line in m.group(1).splitlines() if line.strip()}


@needs_workflow
def test_profile_gpu_rules_exist_in_the_workflow():
    """set-resources for a misspelled rule would silently do nothing: every GPU rule the profile
    names must be a rule of the workflow once the Snakefile includes its stage's rule file."""
    res = subprocess.run([*SNAKEMAKE, "-s", str(SNAKEFILE), "--configfile", str(TINY), "--list-rules"],
                         cwd=REPO, env=workflow_env(os.environ), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rules = set(res.stdout.split())
    prof = load_profile()
    checked = 0
    snakefile = SNAKEFILE.read_text()
    for smk, names in STAGE_GPU_RULES.items():
        if re.search(r'^include:\s*"rules/%s"' % re.escape(smk), snakefile, re.M):
            for name in names:
                assert name in rules, f"profiles/slurm configures rule {name!r}, which rules/{smk} does not define"
                assert name in prof["set-resources"]
                checked += 1
    assert checked >= 1


def dry_run_resources(output: str) -> dict[str, dict[str, str]]:
    """{rule: {resource: value}} from a dry-run's job listing."""
    found = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", output, re.M):
        found[m.group(1)] = dict(kv.split("=", 1) for kv in m.group(2).split(", ") if "=" in kv)
    return found


@needs_workflow
def test_dry_run_through_the_profile_shows_the_slurm_requests(tmp_path):
    """No Slurm needed: the committed profile, as Snakemake reads it with the real workflow, gives
    the GPU rules their GPU partition/GPU/CPU/memory request and the CPU rules the CPU partition."""
    overlay = tiny_overlay(tmp_path)
    res = subprocess.run([*SNAKEMAKE, "-s", str(SNAKEFILE), "-d", str(tmp_path), "-n", "--profile",
                          str(PROFILE.parent), "--configfile", str(TINY), str(overlay)],
                         cwd=tmp_path, env=workflow_env(os.environ), capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "workflow specific profile" in out and str(DEFAULT_PROFILE) in out  # profiles/default is layered on
    resources = dry_run_resources(out)
    prof = load_profile()
    assert "prep" in resources and "sdg" in resources, out[-4000:]
    for rule, res_ in resources.items():
        want = prof["set-resources"].get(rule)
        if want:
            for key in ("slurm_partition", "gpu", "cpus_per_gpu", "mem_mb", "runtime"):
                assert res_[key] == str(want[key]), (rule, key, res_)
        else:
            assert res_["slurm_partition"] == prof["default-resources"]["slurm_partition"], (rule, res_)
            assert "gpu" not in res_ or res_["gpu"] == "0", (rule, res_)


def tiny_targets() -> list[str]:
    """The default target (stages 0-4: 220-245 s through this Slurm on a shared 2-core machine,
    ~180 s for stages 0-2 alone), unless RERANKFLOW_SLURM_TINY_TARGETS names targets
    (space-separated, e.g. "finetune" or "prep") to shorten a CI run."""
    return os.environ.get("RERANKFLOW_SLURM_TINY_TARGETS", "").split()


@needs_slurm
@needs_workflow
def test_tiny_pipeline_runs_through_slurm(cluster, tmp_path):
    """The real tiny pipeline through the profile: every job is a Slurm job, the GPU rules were
    submitted to the GPU partition with a GPU, the CPU rules to the CPU partition without one."""
    prof = fitted_profile(tmp_path / "profile", cluster)
    overlay = tiny_overlay(tmp_path)
    wd = tmp_path / "run"
    wd.mkdir()
    t0 = time.monotonic()
    # targets before --configfile, which takes several values
    res = run_snakemake(["-s", str(SNAKEFILE), "-d", str(wd), "--profile", str(prof),
                         "--workflow-profile", str(DEFAULT_PROFILE), *tiny_targets(),
                         "--configfile", str(TINY), str(overlay)], wd, workflow_env(cluster.env()), 900)
    seconds = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"rc {res.returncode}:\n{out[-8000:]}"
    stats = job_stats(out)
    local = {"all", "write_default_corpus", "stop_deploy"}
    remote_jobs = sum(n for rule, n in stats.items() if rule not in local)
    jobs = submitted_jobs(out)
    assert remote_jobs >= 2 and len(jobs) == remote_jobs, (stats, jobs)
    assert "localrule prep" not in out and "localrule sdg" not in out
    out_dir = tmp_path / "out"
    assert (out_dir / "stage1_prep" / "train_mined.automodel_unrolled.json").is_file()
    assert (out_dir / "stage1_prep" / "eval_beir" / "qrels" / "test.tsv").is_file()

    by_rule: dict[str, dict] = {}
    for jobid in jobs:
        info = scontrol_job(cluster, jobid)
        assert info["JobState"] == "COMPLETED", info
        by_rule[info["Comment"].removeprefix("rule_")] = info
    profile = load_profile()
    for rule, info in by_rule.items():
        if rule in profile["set-resources"] and profile["set-resources"][rule].get("gpu"):
            assert info["Partition"] == profile["set-resources"][rule]["slurm_partition"]
            assert re.search(r"gpu:%d\b" % profile["set-resources"][rule]["gpu"], info.get("TresPerJob", "")), info
        else:
            assert info["Partition"] == profile["default-resources"]["slurm_partition"]
            assert "gpu" not in info.get("TresPerJob", "")
    assert "prep" in by_rule
    print(f"\ntiny pipeline through Slurm: {seconds:.1f} s, jobs {sorted(by_rule)}", file=sys.stderr)
