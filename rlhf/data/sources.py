"""Reading data sources: files (JSONL, JSON, Parquet, CSV), directories and hub names, into numbered records;
the problem and report types every loader shares."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


# --------------------------------------------------------------------------------------------------------------
# Problems and errors


@dataclass
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def problem_at(row: dict[str, Any], message: str) -> Problem:
    """A problem located by a loaded row's `source` ("PATH:LINE")."""
    path, _, line = row["source"].rpartition(":")
    return Problem(path, int(line), message)


class DegenerateRow(ValueError):
    """A well-formed row the policy drops; `reason` is the count's key, the message says where."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class DataError(Exception):
    """Bad input. Carries every problem found so the user fixes them in one pass."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more problems" if len(problems) > 50 else ""
        super().__init__(shown + more)


@dataclass
class Record:
    """One raw row and where it came from (line is 1-based; CSV counts the header, Parquet/hub rows count from 1)."""

    path: str
    line: int
    row: dict[str, Any]


@dataclass
class Report:
    """What loading did: rows read, kept, and every drop with its reason (never silent).

    `rows` counts source rows; `kept` counts examples (a K-way ranking row gives K(K-1)/2 pairs); drops count
    source rows for degenerate data and examples for over-length ones. `empty_answers` counts kept examples with
    an empty assistant turn.
    """

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    empty_answers: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    dropped_at: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def drop(self, reason: str, where: Problem | None = None) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if where is not None:
            self.dropped_at.append(where)

    def counts(self) -> dict[str, Any]:
        """The figures `rlhf data validate` prints and stages write into their manifest."""
        return {
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.drops.items())),
            "empty_answers_kept": self.empty_answers,
            "truncated": self.truncated,
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.drops.items())) or "none"
        return (
            f"{self.rows} rows read, {self.kept} kept ({self.truncated} truncated, "
            f"{self.empty_answers} with an empty answer), dropped: {dropped}"
        )


# --------------------------------------------------------------------------------------------------------------
# Reading raw records


def expand_sources(sources: str | list[str]) -> list[str]:
    """Files in the order given; a directory contributes its data files, sorted, recursively."""
    out: list[str] = []
    for source in [sources] if isinstance(sources, str) else sources:
        if os.path.isdir(source):
            out.extend(
                str(p) for p in sorted(Path(source).rglob("*")) if p.is_file() and p.suffix in FILE_SUFFIXES
            )
        else:
            out.append(source)
    return out


def looks_like_hub_name(source: str) -> bool:
    return (
        not os.path.exists(source)
        and not source.endswith(FILE_SUFFIXES)
        and not source.startswith((".", "/"))
    )


def read_records(source: str, problems: list[Problem]) -> Iterator[Record]:
    """Yield the rows of one file (or hub dataset); append read errors (bad JSON, bad bytes) to `problems`."""
    if looks_like_hub_name(source):
        yield from _read_hub(source, problems)
        return
    if not os.path.exists(source):
        problems.append(Problem(source, 0, "file not found"))
        return
    data = Path(source).read_bytes()
    if not data.strip():
        problems.append(Problem(source, 1, "empty file (no records)"))
        return
    suffix = Path(source).suffix
    if suffix == ".parquet":
        yield from _read_parquet(source)
        return
    text = _decode(source, data, problems)
    if text is None:
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield Record(source, reader.line_num, dict(row))
    elif suffix == ".json" or text.lstrip().startswith("["):
        yield from _read_json_array(source, text, problems)
    else:
        yield from _read_jsonl(source, text, problems)


def _decode(path: str, data: bytes, problems: list[Problem]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        problems.append(
            Problem(path, line, f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})")
        )
        return None


def _read_jsonl(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(path, number, f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(path, number, f"expected a JSON object, found {type(row).__name__}"))
            continue
        yield Record(path, number, row)


def _read_json_array(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    """A JSON file holding a list of objects (or {"data": [...]}); line numbers point at each object's start."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        problems.append(Problem(path, err.lineno, f"malformed JSON ({err.msg} at column {err.colno})"))
        return
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if not isinstance(parsed, list):
        problems.append(Problem(path, 1, 'expected a list of objects (or {"data": [...]})'))
        return
    # Objects' own opening braces are found by walking the decoder, so nested braces don't shift line numbers.
    decoder, position, lines = json.JSONDecoder(), _list_start(text), []
    for _ in parsed:
        while text[position] in " \t\r\n,":
            position += 1
        lines.append(text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)
    for row, line in zip(parsed, lines, strict=True):
        if not isinstance(row, dict):
            problems.append(Problem(path, line, f"expected a JSON object, found {type(row).__name__}"))
            continue
        yield Record(path, line, row)


def _list_start(text: str) -> int:
    """The position just after the `[` of the rows: the top-level list, or the value of the top-level "data" key
    (other keys may hold lists of their own; of repeated keys the last counts, as for `json.loads`)."""
    decoder, position = json.JSONDecoder(), len(text) - len(text.lstrip())
    if text[position] == "[":
        return position + 1
    position, start = position + 1, None  # past "{"
    while True:
        while text[position] in " \t\r\n,":
            position += 1
        if text[position] == "}":
            return start
        key, position = decoder.raw_decode(text, position)
        while text[position] in " \t\r\n:":
            position += 1
        if key == "data":
            start = position + 1
        _, position = decoder.raw_decode(text, position)


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # datasets depends on pyarrow

    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield Record(path, index, row)


def _read_hub(source: str, problems: list[Problem]) -> Iterator[Record]:
    import datasets

    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    # datasets raises many types (not found, offline, bad split); all of them mean "cannot read".
    except Exception as err:
        problems.append(
            Problem(source, 0, f"no such file, nor a hub dataset that loads ({type(err).__name__}: {err})")
        )
        return
    for index, row in enumerate(dataset, start=1):
        yield Record(source, index, dict(row))


def content_hash(sources: str | list[str]) -> dict[str, str]:
    """sha256 of each local source file (hub names map to their name): recorded in manifests."""
    hashes = {}
    for path in expand_sources(sources):
        if os.path.isfile(path):
            hashes[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        else:
            hashes[path] = "hub:" + path
    return hashes


# --------------------------------------------------------------------------------------------------------------
