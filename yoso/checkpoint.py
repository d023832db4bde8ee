"""Checkpoint folders: written under a temporary name and renamed when complete, so ``latest`` never
picks up a half-written one; pruned oldest-first to ``--checkpoints_total_limit``."""

import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"


def list_checkpoints(output_dir):
    """Complete checkpoints in ``output_dir``, oldest first, as (step, path)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def incomplete_path(output_dir, step):
    return Path(output_dir) / f"checkpoint-{step}{INCOMPLETE_SUFFIX}"


def finalize(output_dir, step):
    """Rename the finished temporary folder to ``checkpoint-<step>``; returns the final path."""
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    incomplete_path(output_dir, step).rename(final)
    return final


def prune(output_dir, total_limit):
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns what was removed."""
    if not total_limit:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]]
    for path in removed:
        shutil.rmtree(path)
    return removed
