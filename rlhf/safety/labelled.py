"""Hand-labelled safety data: prompt rows {prompt, category?}, completion rows {prompt, completion, label?,
category?} and example files, read through the data module so a bad row is reported as PATH:LINE."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf.data import DataError, Problem, read_records
from rlhf.safety.config import COMPLETION_CLASSES, PROMPT_CLASSES


def _problem(path: str | Path, line: int, message: str) -> DataError:
    return DataError([Problem(str(path), line, message)])


def as_text(value: Any, role: str) -> str:
    """A plain string, or the content of the last `role` message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        contents = [m.get("content") for m in value if m.get("role") == role]
        if contents and isinstance(contents[-1], str):
            return contents[-1]
    raise TypeError(f"expected a string or a list of messages with a {role!r} turn, got {value!r:.80}")


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    """(line number, row) through the data module's reader; malformed lines raise `DataError` with PATH:LINE."""
    problems: list[Problem] = []
    records = list(read_records(str(path), problems))
    if problems:
        raise DataError(problems)
    return [(record.line, record.row) for record in records]


def read_labelled(path: str | Path) -> tuple[str, list[dict]]:
    """Read prompt rows ({prompt, category?}) or completion rows ({prompt, completion, label?, category?}).

    Returns ("prompts" | "completions", rows) with `prompt` / `completion` reduced to text.
    """
    mode, rows = None, []
    for line_no, row in _read_jsonl(path):
        row_mode = "completions" if "completion" in row else "prompts"
        if mode is not None and row_mode != mode:
            raise _problem(path, line_no, "mixes prompt rows and (prompt, completion) rows")
        mode = row_mode
        try:
            row["prompt"] = as_text(row.get("prompt"), "user")
            if mode == "completions":
                row["completion"] = as_text(row["completion"], "assistant")
        except TypeError as exc:
            raise _problem(path, line_no, f"{exc}") from None
        if row.get("category") is not None and row["category"] not in PROMPT_CLASSES:
            raise _problem(
                path, line_no, f"category must be one of {PROMPT_CLASSES}, got {row['category']!r}"
            )
        if row.get("label") is not None and row["label"] not in COMPLETION_CLASSES:
            raise _problem(path, line_no, f"label must be one of {COMPLETION_CLASSES}, got {row['label']!r}")
        rows.append(row)
    if mode is None:
        raise _problem(path, 1, "no rows")
    return mode, rows


def load_examples(path: str) -> dict[str, list[str]]:
    """Examples by class from {text, label} rows, labelled prompt rows {prompt, category} or labelled
    completion rows {prompt, completion, label} (the labelled sets of data/safety can serve as examples)."""
    examples: dict[str, list[str]] = {}
    for line_no, row in _read_jsonl(path):
        if "text" in row:
            text, label = row.get("text"), row.get("label")
        elif "completion" in row:
            text, label = row.get("completion"), row.get("label")
        else:
            text, label = row.get("prompt"), row.get("category")
        if not isinstance(text, str) or label not in PROMPT_CLASSES + COMPLETION_CLASSES:
            raise _problem(
                path,
                line_no,
                "expected {'text': str, 'label': <class>}, {'prompt': str, 'category': <prompt class>} "
                "or {'prompt': ..., 'completion': str, 'label': <completion class>}",
            )
        examples.setdefault(label, []).append(text)
    return examples
