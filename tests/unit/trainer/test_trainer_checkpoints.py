"""Checkpoint atomicity: only published (marked) checkpoints are ever resumed from."""

from __future__ import annotations

from pathlib import Path

from kubetune.trainer import checkpoints


def stage(root: Path, step: int, files: dict[str, str] | None = None) -> Path:
    staged = root / checkpoints.STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    for name, text in (files or {"adapter_model.safetensors": "w", "optimizer.pt": "o"}).items():
        (staged / name).write_text(text)
    return staged


def test_published_checkpoint_is_complete_and_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        published = checkpoints.publish(stage(root, step), root, {"step": step})
        assert published == root / f"checkpoint-{step}"
    assert checkpoints.newest(root) == root / "checkpoint-20"
    assert checkpoints.read_marker(root / "checkpoint-20") == {"step": 20}
    assert not (root / checkpoints.STAGING / "checkpoint-20").exists()


def test_a_checkpoint_being_written_is_never_resumed(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    checkpoints.publish(stage(root, 10), root, {"step": 10})
    stage(root, 20)  # preempted while the Trainer was still writing it
    assert checkpoints.newest(root) == root / "checkpoint-10"
    removed = checkpoints.remove_incomplete(root)
    assert removed == [root / checkpoints.STAGING]
    assert checkpoints.newest(root) == root / "checkpoint-10"


def test_unmarked_checkpoint_folder_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    checkpoints.publish(stage(root, 10), root, {"step": 10})
    partial = root / "checkpoint-30"  # e.g. copied by hand, or written by another tool
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_text("half")
    assert checkpoints.newest(root) == root / "checkpoint-10"
    assert checkpoints.remove_incomplete(root) == [partial]
    assert not partial.exists()


def test_republishing_a_step_replaces_an_unmarked_leftover(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    leftover = root / "checkpoint-10"
    leftover.mkdir(parents=True)
    (leftover / "stale").write_text("x")
    checkpoints.publish(stage(root, 10), root, {"step": 10})
    assert not (root / "checkpoint-10" / "stale").exists()
    assert checkpoints.read_marker(root / "checkpoint-10") == {"step": 10}


def test_marker_is_written_last(tmp_path: Path) -> None:
    """A marker only ever appears complete: no temporary file is left behind."""
    root = tmp_path / "checkpoints"
    published = checkpoints.publish(stage(root, 5), root, {"step": 5, "attempts": 2})
    assert sorted(p.name for p in published.iterdir()) == [
        "adapter_model.safetensors",
        checkpoints.MARKER,
        "optimizer.pt",
    ]


def test_rotation_keeps_the_newest_complete(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        checkpoints.publish(stage(root, step), root, {"step": step})
    stage(root, 40)
    assert checkpoints.rotate(root, keep=2) == [root / "checkpoint-10"]
    assert [p.name for p in checkpoints.complete(root)] == ["checkpoint-20", "checkpoint-30"]


def test_sorting_is_numeric(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (9, 100, 20):
        checkpoints.publish(stage(root, step), root, {"step": step})
    assert checkpoints.newest(root) == root / "checkpoint-100"


def test_no_checkpoints(tmp_path: Path) -> None:
    assert checkpoints.newest(tmp_path / "missing") is None
    assert checkpoints.remove_incomplete(tmp_path / "missing") == []
