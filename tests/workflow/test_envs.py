"""envs/*.yaml (for `snakemake --sdm conda`) must pin exactly what requirements.txt pins."""

import re

import yaml

from conftest import REPO


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_conda_envs_agree_with_requirements():
    req = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert "torch" in req and req["torch"] == "2.13.0"
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "envs/ holds no conda environment files"
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip_lines = [d for dep in env["dependencies"] if isinstance(dep, dict) for d in dep.get("pip", [])]
        pins = _pins(pip_lines)
        assert pins, f"{env_file.name} pins nothing"
        for name, version in pins.items():
            assert name in req, f"{env_file.name} pins {name}, which requirements.txt does not"
            assert req[name] == version, f"{env_file.name} pins {name}=={version}, requirements.txt {req[name]}"
        python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
        assert python == ["python=3.11"], f"{env_file.name} must pin python=3.11"


def test_every_rule_env_exists():
    for smk in (REPO / "rules").glob("*.smk"):
        for rel in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / rel).resolve().exists(), f"{smk.name} names missing env {rel}"
