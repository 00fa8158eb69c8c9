"""Resumable checkpoints that are either complete or invisible.

Layout under the job's output folder::

    checkpoints/
      checkpoint-40/            complete: has kubetune-complete.json
      checkpoint-50/            complete (the newest one is resumed from)
      .staging/checkpoint-60/   being written; never resumed from, removed on start

The Hugging Face Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, trainer
state with the data position) into ``.staging/``; then :func:`publish` writes the marker,
flushes it to disk and renames the folder into place. A rename within one file system is
atomic, so a preemption at any moment leaves either the old set of checkpoints or the new one.
A ``checkpoint-N`` folder without a marker (from an older writer, or a copy) is not trusted
either. Only the newest :data:`KEEP` complete checkpoints are kept, and older ones are removed
only after the new one is published.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
MARKER = "kubetune-complete.json"
KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d+)$")


def root_of(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of(child)
        if step is not None and child.is_dir() and read_marker(child) is not None:
            found.append((step, child))
    return [path for _, path in sorted(found)]


def newest(root: Path) -> Path | None:
    done = complete(root)
    return done[-1] if done else None


def remove_incomplete(root: Path) -> list[Path]:
    """Delete the staging area and any unmarked ``checkpoint-N`` folder; return what went."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if child.name == STAGING or (step_of(child) is not None and read_marker(child) is None):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    for path in removed:
        log.warning("removed incomplete checkpoint %s", path)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some file systems refuse O_RDONLY on folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / (MARKER + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MARKER)
    _fsync_dir(folder)


def publish(staged: Path, root: Path, info: dict[str, Any]) -> Path:
    """Mark a fully written staged checkpoint complete and move it into ``root``."""
    for child in staged.iterdir():
        if child.is_file():
            with child.open("rb") as f:
                os.fsync(f.fileno())
    write_marker(staged, info)
    target = root / staged.name
    if target.exists():  # an unmarked leftover of the same step
        shutil.rmtree(target)
    staged.replace(target)
    _fsync_dir(root)
    with contextlib.suppress(OSError):  # left in place while another rank still writes
        staged.parent.rmdir()
    return target


def rotate(root: Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints."""
    done = complete(root)
    old = done[:-keep] if keep > 0 else done
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old
