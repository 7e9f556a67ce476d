"""``python -m rerankflow.sdg``: stage 0 with the llm backend outside Snakemake.

``python -m rerankflow.sdg --configfile C [--configfile C2] [--corpus DIR] (--preview | --out DIR)``

The config files are merged as Snakemake merges ``--configfile`` (later files override key by key)
and validated with :func:`rerankflow.config.load_config`, which fills the schema's defaults. The
folders the workflow derives are derived the same way here: the output folder is
``<output_dir>/stage0_sdg`` and the call cache ``<out>/.llm_cache`` unless ``sdg.llm.cache_dir`` is set.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from rerankflow.config import load_config
from rerankflow.errors import InputError
from rerankflow.sdg.llm import preview_llm
from rerankflow.sdg.llm_client import scrub
from rerankflow.sdg.run import run_sdg


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rerankflow.sdg", description=(
        "Stage 0 with the llm backend outside Snakemake. --preview generates for sdg.preview_documents "
        "documents and prints them, writing nothing; otherwise the full stage 0 runs and writes to --out."))
    ap.add_argument("--configfile", action="append",
                    help="workflow config (YAML); repeatable, later files override (default config/config.yaml)")
    ap.add_argument("--corpus", help="corpus folder (default: corpus.dir of the config)")
    ap.add_argument("--out", help="output folder of a full run (default: <output_dir>/stage0_sdg)")
    ap.add_argument("--preview", action="store_true", help="preview: generate, print, persist nothing")
    ap.add_argument("--documents", type=int, help="documents to preview (default sdg.preview_documents)")
    return ap.parse_args(argv)


def read_config(paths) -> dict:
    """The validated config of the given files (defaults from the schema)."""
    overlays = [yaml.safe_load(Path(p).read_text(encoding="utf-8")) or {} for p in paths or ["config/config.yaml"]]
    try:
        return load_config(*overlays)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def run(args: argparse.Namespace) -> None:
    conf = read_config(args.configfile)
    sdg_cfg = dict(conf["sdg"], backend="llm")
    corpus = args.corpus or conf["corpus"]["dir"]
    if not corpus:
        raise InputError("no corpus folder: pass --corpus DIR", key="corpus.dir")
    if args.preview:
        if args.documents:
            sdg_cfg["preview_documents"] = args.documents
        preview_llm(corpus, conf["corpus"], sdg_cfg, conf["retrieval"], conf["seed"], conf["device"])
        return
    out = args.out or str(Path(conf["output_dir"]) / "stage0_sdg")
    llm = dict(sdg_cfg["llm"])
    if not llm["cache_dir"]:
        llm["cache_dir"] = str(Path(out) / ".llm_cache")
    sdg_cfg.update(preview=False, llm=llm)
    manifest = run_sdg(corpus, out, conf["corpus"], sdg_cfg, conf["retrieval"], conf["seed"], conf["device"])
    print(f"wrote {manifest}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except InputError as exc:
        print(f"error: {scrub(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
