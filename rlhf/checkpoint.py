"""Checkpoints that are complete or ignored, and the manifest that hands a stage's output to the next.

- A training checkpoint directory counts only with its `COMMITTED` marker. PPO writes a checkpoint into a
  temporary sibling, writes the marker, then renames it into place; Trainer checkpoints (SFT, reward model) get
  their marker from a callback once the Trainer has finished writing them. Automatic resume skips uncommitted ones.
- A stage's output directory counts only with `manifest.json`, written last with an atomic rename. A run removes a
  stale manifest before it writes anything, so a crash never leaves a directory that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.config import redact

COMMIT_MARKER = "COMMITTED"
# Siblings `atomic_directory` makes while it saves `<name>`: `<WRITING><name>-<pid>`, `<REPLACED><name>-<pid>`.
WRITING, REPLACED = ".tmp-", ".old-"
MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"^(checkpoint|step)-(\d+)$")
log = logging.getLogger(__name__)


class HandoffError(RuntimeError):
    """A stage output the next stage must not consume: unfinished, corrupted, or not what it expects."""


class ResumeError(RuntimeError):
    """An explicit resume path that cannot be resumed from."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_json_object(path: str | Path, error: type[Exception]) -> dict[str, Any]:
    """A JSON file holding an object; one that does not parse, or holds something else, raises `error` naming it."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise error(f"{path}: expected a JSON object, found {type(loaded).__name__}")
    return loaded


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` (secrets redacted) in `path`, whole or not at all: written aside, synced, then renamed. Missing
    directories on the way are made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(redact(text))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Training checkpoints


def mark_committed(path: str | Path) -> None:
    write_json_atomic(Path(path) / COMMIT_MARKER, {"committed_at": time.time()})


def is_committed(path: str | Path) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


@contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary directory; on success mark it committed and rename it to `final`."""
    final = Path(final)
    tmp = final.with_name(f"{WRITING}{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    mark_committed(tmp)
    if final.exists():
        trash = final.with_name(f"{REPLACED}{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def committed_checkpoints(directory: str | Path) -> list[Path]:
    """Committed `checkpoint-N` / `step-N` directories, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name) and is_committed(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(2)))


def rotate_checkpoints(directory: str | Path, keep_last: int | None, protect: str | None = None) -> None:
    """Delete old committed checkpoints but the last `keep_last` (None or < 1: keep all, as transformers reads
    `save_total_limit`) and `protect` (the Trainer's best checkpoint); called only after the newest is committed."""
    if not keep_last or keep_last < 1:
        return
    for old in committed_checkpoints(directory)[:-keep_last]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)


def move_aside(path: str | Path, label: str) -> Path:
    """Rename `path` to `<path>.<label>-<time>` (a counter added when that exists): kept, never deleted."""
    base = f"{path}.{label}-{time.strftime('%Y%m%dT%H%M%S')}"
    target, n = base, 1
    while os.path.exists(target):  # moved twice within a second
        target, n = f"{base}-{n}", n + 1
    os.rename(path, target)
    return Path(target)


def remove_interrupted_saves(directory: Path) -> None:
    """Clear what a crashed `atomic_directory` left (on a real model each holds gigabytes). An uncommitted copy is
    deleted. A committed one whose checkpoint name is free goes into place: the crash came between moving the old
    checkpoint aside and renaming the new one (the new copy is taken first, then the old). Anything else is a
    copy its checkpoint no longer needs."""
    leftovers = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith((WRITING, REPLACED))]
    # The new copy first: the replaced one is only wanted if no committed new copy took its name.
    for leftover in sorted(leftovers, key=lambda p: (not p.name.startswith(WRITING), p.name)):
        prefix = WRITING if leftover.name.startswith(WRITING) else REPLACED
        final = directory / leftover.name.removeprefix(prefix).rsplit("-", 1)[0]
        if final.exists() or not is_committed(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.replace(leftover, final)


def set_aside_later_checkpoints(directory: str | Path, resume: str | None) -> list[Path]:
    """Before a run trains: remove interrupted saves, and move the checkpoints in `directory` past the one this run
    resumes from (all of them on a fresh start) to `<name>.abandoned-<time>`. They belong to a line of training this run does not continue: left in place they
    would outrank its own checkpoints, in rotation (which keeps the highest steps) and in `resume: auto`, and a
    Trainer saving the same step again would write into a directory that already carries a commit marker."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    remove_interrupted_saves(directory)
    start = -1
    if resume:
        match = CHECKPOINT_NAME.match(Path(resume).name)
        if match is None:  # a renamed checkpoint: its step is not known, so nothing is known to come after it
            return []
        start = int(match.group(2))
    later = [
        p for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and int(m.group(2)) > start
    ]
    moved = [move_aside(p, "abandoned") for p in sorted(later)]
    if moved:
        log.warning(
            "%s: %d checkpoint(s) %s this run's start moved aside: %s",
            directory,
            len(moved),
            "after" if resume else "from before",
            ", ".join(p.name for p in moved),
        )
    return moved


def resolve_resume(request: str | bool | None, directory: str | Path) -> str | None:
    """None/False: fresh. "auto"/"last"/True: newest committed checkpoint, or fresh with a warning. A path: it must exist."""
    if request in (None, False, "", "false", "False", "none"):
        return None
    if request in (True, "auto", "last", "true", "True"):
        found = committed_checkpoints(directory)
        if not found:
            log.warning("resume requested but no committed checkpoint in %s: starting fresh", directory)
            return None
        return str(found[-1])
    path = Path(str(request))
    if not path.is_dir():
        raise ResumeError(f"resume_from_checkpoint: {path} does not exist")
    if not is_committed(path):
        raise ResumeError(
            f"resume_from_checkpoint: {path} has no {COMMIT_MARKER} marker (an interrupted save)"
        )
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Stage manifests


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("rlhf", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "padding_side": tokenizer.padding_side,
        "vocab_size": len(tokenizer),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def begin_stage_output(output_dir: str | Path) -> None:
    """Invalidate a previous run's manifest before writing anything new into `output_dir`."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / MANIFEST).unlink(missing_ok=True)


def model_files(output_dir: str | Path) -> list[str]:
    """The files the next stage loads (weights, configs, tokenizer): hashed in the manifest."""
    keep = (".safetensors", ".json", ".jinja", ".txt", ".model")
    skip = {MANIFEST, "trainer_state.json", COMMIT_MARKER}
    return sorted(
        p.name for p in Path(output_dir).iterdir() if p.is_file() and p.suffix in keep and p.name not in skip
    )


def write_manifest(
    output_dir: str | Path,
    stage: str,
    config: dict[str, Any],
    data: dict[str, str],
    metrics: dict[str, Any],
    tokenizer=None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The commit marker of a stage output: written last, atomically, with the hash of every model file."""
    manifest = {
        "stage": stage,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "data": data,
        "metrics": metrics,
        "versions": package_versions(),
        "files": {name: sha256_file(Path(output_dir) / name) for name in model_files(output_dir)},
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        **(extra or {}),
    }
    write_json_atomic(Path(output_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(output_dir: str | Path, stage: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Load a finished stage's manifest, checking it is complete and (by default) that no file changed."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise HandoffError(
            f"{output_dir}: no {MANIFEST}; the stage did not finish (or this is not a stage output)"
        )
    manifest = read_json_object(path, HandoffError)
    if not manifest.get("complete"):
        raise HandoffError(f"{path}: manifest is not marked complete")
    if stage is not None and manifest.get("stage") != stage:
        raise HandoffError(f"{path}: expected a {stage!r} stage output, found {manifest.get('stage')!r}")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            file = Path(output_dir) / name
            if not file.is_file():
                raise HandoffError(f"{output_dir}: {name} is missing (listed in {MANIFEST})")
            if sha256_file(file) != digest:
                raise HandoffError(f"{output_dir}: {name} does not match its hash in {MANIFEST} (corrupted?)")
        pickles = [n for n in os.listdir(output_dir) if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
        if pickles and not (Path(output_dir) / "adapter_config.json").exists():
            raise HandoffError(f"{output_dir}: pickle weight files {pickles} are refused; use safetensors")
    return manifest


def stage_manifest(path: str | Path, stage: str | None = None) -> dict[str, Any] | None:
    """A local stage output given as a start model must be complete and unchanged; a hub name or plain model
    directory (no manifest, no config.yaml) has none."""
    if (Path(path) / MANIFEST).is_file() or (Path(path) / "config.yaml").is_file():
        return read_manifest(path, stage)
    return None


def tokenizer_differences(
    manifest: dict[str, Any], tokenizer, keys: tuple[str, ...] | None = None
) -> list[tuple[str, Any, Any]]:
    """(key, recorded, found) for each fingerprint field (of `keys`, or all recorded) where `tokenizer` differs from
    the one a stage's manifest recorded; none when the manifest recorded no tokenizer."""
    expected, found = manifest.get("tokenizer") or {}, tokenizer_fingerprint(tokenizer)
    keys = [k for k in (keys or expected) if k in expected]
    return [(k, expected[k], found.get(k)) for k in keys if expected[k] != found.get(k)]


def check_tokenizer_matches(manifest: dict[str, Any], tokenizer, where: str) -> None:
    """Refuse a tokenizer that differs from the one the previous stage trained with."""
    diffs = [f"{k}: expected {e!r}, found {f!r}" for k, e, f in tokenizer_differences(manifest, tokenizer)]
    if diffs:
        raise HandoffError(
            f"{where}: tokenizer differs from the one recorded in its manifest ({'; '.join(diffs)})"
        )


# --------------------------------------------------------------------------------------------------------------
# Random-number state (exact resume of our own loop)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as tensors and plain containers (loadable with weights_only)."""
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
