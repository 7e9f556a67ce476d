"""Checkpoint folders of a run: list, point BEST/LATEST at, prune, prepare for resuming, finish.

Layout under ``out_dir``::

    checkpoints/epoch_<e>_step_<s>/model/consolidated/   HF checkpoint + tokenizer + README.md (model card)
    checkpoints/epoch_<e>_step_<s>/training_state/       optimizer, scheduler, RNG, data order, log so far
    checkpoints/BEST, checkpoints/LATEST                 relative symlinks to step directories

A step directory is written under a temporary name and renamed (:func:`rerankflow.io.atomic_path`), so a
listed checkpoint is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from rerankflow.io import write_json, write_jsonl
from rerankflow.scoring.fusion import FUSION_RECORD
from rerankflow.train.report import plot_curve

log = logging.getLogger("rerankflow.train.finetune")

CKPT_RE = re.compile(r"^epoch_(\d+)_step_(\d+)$")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, str]]:
    """``[(step, name)]`` of complete checkpoints (atomic renames: a listed one is complete)."""
    out = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = CKPT_RE.match(d.name)
            if m and not d.is_symlink() and (d / "training_state" / "trainer_state.json").exists():
                out.append((int(m.group(2)), d.name))
    return sorted(out)


def set_link(ckpt_dir: Path, name: str, target: str) -> None:
    """Atomically point ``ckpt_dir/name`` at ``target`` (relative symlink)."""
    tmp = ckpt_dir / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, ckpt_dir / name)


def prepare_checkpoint_dir(ckpt_dir: Path, h: str, out_dir: Path) -> str | None:
    """Clean leftovers; move checkpoints of another config/data aside; return the checkpoint to resume."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for d in ckpt_dir.iterdir():
        if d.name.startswith(".") and d.name.endswith(".tmp"):  # half-written by a killed run
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink()
    matching, stale = [], []
    for _step, name in list_checkpoints(ckpt_dir):
        try:
            st = json.loads((ckpt_dir / name / "training_state" / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            stale.append(name)
            continue
        (matching if st.get("hash") == h else stale).append(name)
    if stale:
        dest = out_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for name in stale:
            shutil.move(str(ckpt_dir / name), str(dest / name))
        log.warning("%d checkpoints were trained with another config or data; moved to %s (delete when not needed) "
                    "and starting fresh", len(stale), dest)
    for link in ("BEST", "LATEST"):
        p = ckpt_dir / link
        if p.is_symlink() and not p.exists():
            p.unlink()
    if not matching:
        for link in ("BEST", "LATEST"):
            p = ckpt_dir / link
            if p.is_symlink():
                p.unlink()
        return None
    steps = {n: int(CKPT_RE.match(n).group(2)) for n in matching}
    return max(matching, key=lambda n: steps[n])


def prune(ckpt_dir: Path, keep_last: int, keep: set) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never BEST/LATEST targets."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(ckpt_dir)
    protected = set(keep)
    for link in ("BEST", "LATEST"):
        p = ckpt_dir / link
        if p.is_symlink():
            protected.add(os.readlink(p))
    for _step, name in ckpts[:-keep_last]:
        if name not in protected:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def _best_fusion(step_dir: Path) -> dict | None:
    """The fusion record written with the BEST checkpoint (None without first-stage validation)."""
    path = Path(step_dir) / "model" / "consolidated" / FUSION_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def finish(ckpt_dir, out_dir, state, records, data, pairs_done, t_train) -> dict:
    """Point LATEST at the last step and BEST at the best validated one; write the final log, curve and summary."""
    final_name = f"epoch_{state['epoch']}_step_{state['step']}"
    set_link(ckpt_dir, "LATEST", final_name)
    best = state["best_name"] if data.val and state["best_name"] else final_name
    if not (ckpt_dir / best).is_dir():
        best = final_name
    set_link(ckpt_dir, "BEST", best)
    summary = {"steps": state["step"], "total_steps": state["total_steps"], "epoch": state["epoch"],
               "best": best, "latest": final_name, "best_val_ndcg@10": state["best_metric"],
               "last_val": state["last_val"], "base_val": state.get("base_val"),
               "best_fusion": _best_fusion(ckpt_dir / best), "stopped_early": state["stopped_early"],
               "pairs_per_s": round(pairs_done / t_train, 3) if t_train > 0 else None, "hash": state["hash"],
               "setup": state.get("setup")}
    if not records or records[-1].get("event") != "end":
        records.append({"event": "end", **summary, "time": time.time()})
    write_jsonl(out_dir / "training_log.jsonl", records)
    plot_curve(records, out_dir / "training_curve.png")
    write_json(out_dir / "training_summary.json", summary)
    log.info("done: %d steps; BEST -> %s, LATEST -> %s", state["step"], best, final_name)
    return summary
