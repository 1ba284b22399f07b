"""Checkpoints are complete or ignored; manifests refuse changed, missing or mismatched hand-offs."""

from __future__ import annotations

import pytest

from rlhf.checkpoint import (
    HandoffError,
    ResumeError,
    atomic_directory,
    check_tokenizer_matches,
    committed_checkpoints,
    is_committed,
    mark_committed,
    read_manifest,
    resolve_resume,
    rotate_checkpoints,
    set_aside_later_checkpoints,
    write_manifest,
)


def test_atomic_directory_commits_only_on_success(tmp_path):
    with atomic_directory(tmp_path / "step-1") as tmp:
        (tmp / "weights").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "step-2") as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("crash mid-save")
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-1"]
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step-1")


def test_rotation_keeps_the_newest_committed(tmp_path):
    for step in (1, 2, 3):
        with atomic_directory(tmp_path / f"step-{step}") as tmp:
            (tmp / "w").write_text(str(step))
    rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-2", "step-3"]


def test_rotation_keeps_everything_for_a_limit_below_one_and_always_the_protected(tmp_path):
    for step in (1, 2, 3, 4):
        with atomic_directory(tmp_path / f"checkpoint-{step}") as tmp:
            (tmp / "w").write_text(str(step))
    for limit in (0, -1, -2):  # transformers reads save_total_limit <= 0 as "no rotation"
        rotate_checkpoints(tmp_path, keep_last=limit)
        assert len(committed_checkpoints(tmp_path)) == 4
    rotate_checkpoints(tmp_path, keep_last=1, protect=str(tmp_path / "checkpoint-2"))  # the Trainer's best
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


def test_resume_paths(tmp_path, caplog):
    with pytest.raises(ResumeError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "step-5").mkdir()
    with pytest.raises(ResumeError, match="COMMITTED"):
        resolve_resume(str(tmp_path / "step-5"), tmp_path)
    assert resolve_resume("auto", tmp_path) is None
    assert "starting fresh" in caplog.text
    assert resolve_resume(None, tmp_path) is None


def test_checkpoints_past_the_resume_point_are_moved_aside_never_deleted(tmp_path):
    for step in (1, 2, 3, 4):
        with atomic_directory(tmp_path / f"step-{step}") as tmp:
            (tmp / "w").write_text(str(step))
    (tmp_path / "step-5").mkdir()  # an interrupted save: no marker
    (tmp_path / ".tmp-step-6-4242").mkdir()  # a crashed atomic_directory's temporary directory
    moved = set_aside_later_checkpoints(tmp_path, str(tmp_path / "step-2"))
    assert sorted(p.name.split(".")[0] for p in moved) == ["step-3", "step-4", "step-5"]
    assert all(p.name.startswith(p.name.split(".")[0] + ".abandoned-") for p in moved)
    assert (moved[0] / "w").read_text() == "3"  # kept whole
    # The resumed line is now the newest: `auto` and rotation see it, not the abandoned steps.
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "step-2")
    assert not (tmp_path / ".tmp-step-6-4242").exists()
    with atomic_directory(tmp_path / "step-3") as tmp:
        (tmp / "w").write_text("new 3")
    rotate_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-3"]
    assert (tmp_path / "step-3" / "w").read_text() == "new 3"
    # A fresh start moves every checkpoint aside, again without a name collision.
    moved = set_aside_later_checkpoints(tmp_path, None)
    assert [p.name.split(".")[0] for p in moved] == ["step-3"] and committed_checkpoints(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 4


def test_a_save_that_crashed_between_its_two_renames_is_put_in_place_not_deleted(tmp_path):
    """atomic_directory commits the new copy, moves the old checkpoint aside, then renames the new one into place:
    a crash between the renames leaves no step-3, a committed new copy and the old one."""
    for name, text in ((".tmp-step-3-77", "new"), (".old-step-3-77", "old")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text(text)
        mark_committed(tmp_path / name)
    (tmp_path / ".tmp-step-4-78").mkdir()  # a save that never finished
    (tmp_path / ".old-step-2-76").mkdir()  # its checkpoint was saved again
    mark_committed(tmp_path / ".old-step-2-76")
    (tmp_path / "step-2").mkdir()
    mark_committed(tmp_path / "step-2")
    set_aside_later_checkpoints(tmp_path, str(tmp_path / "step-3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert (tmp_path / "step-3" / "w").read_text() == "new"
    # Only the old copy left (the new one lost): it is the checkpoint.
    (tmp_path / ".old-step-5-80").mkdir()
    mark_committed(tmp_path / ".old-step-5-80")
    set_aside_later_checkpoints(tmp_path, str(tmp_path / "step-5"))
    assert is_committed(tmp_path / "step-5")


def test_manifest_detects_corruption_and_missing_files(tmp_path, tiny_tokenizer):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, "sft", {"a": 1}, {}, {"loss": 1.0}, tiny_tokenizer)
    assert read_manifest(tmp_path, "sft")["metrics"] == {"loss": 1.0}
    with pytest.raises(HandoffError, match="expected a 'reward' stage"):
        read_manifest(tmp_path, "reward")
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(HandoffError, match="model.safetensors does not match"):
        read_manifest(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HandoffError, match="model.safetensors is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"complete": tru')  # hand-edited, or written by another tool
    with pytest.raises(HandoffError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)


def test_unfinished_stage_output_is_refused(tmp_path):
    with pytest.raises(HandoffError, match="did not finish"):
        read_manifest(tmp_path)


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_tokenizer):
    (tmp_path / "config.json").write_text("{}")
    manifest = write_manifest(tmp_path, "sft", {}, {}, {}, tiny_tokenizer)
    check_tokenizer_matches(manifest, tiny_tokenizer, "sft")
    tiny_tokenizer.padding_side = "left"
    try:
        with pytest.raises(HandoffError, match="padding_side: expected 'right', found 'left'"):
            check_tokenizer_matches(manifest, tiny_tokenizer, "sft")
    finally:
        tiny_tokenizer.padding_side = "right"
