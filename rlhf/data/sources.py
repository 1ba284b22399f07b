"""Reading data sources: files (JSONL, JSON, Parquet, CSV), directories and hub names, into numbered records;
the problem and report types every loader shares."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # matched case-insensitively
CSV_CELL_LIMIT = 2**31 - 1  # characters; the largest the csv module accepts on every platform
SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded str only as half of a pair JSON escaped alone


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
    """One raw row and where it came from (line is 1-based; CSV counts the header, Parquet/hub rows count from 1).

    `typed` is False for CSV rows: every cell is text, so the loader decides what an empty or numeric cell means.
    """

    path: str
    line: int
    row: dict[str, Any]
    typed: bool = True


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
                str(p)
                for p in sorted(Path(source).rglob("*"))
                if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
            )
        else:
            out.append(source)
    return out


def looks_like_hub_name(source: str) -> bool:
    return (
        not os.path.exists(source)
        and not source.lower().endswith(FILE_SUFFIXES)
        and not source.startswith((".", "/"))
    )


def read_records(source: str, problems: list[Problem]) -> Iterator[Record]:
    """Yield the rows of one file (or hub dataset); append read errors (bad JSON, bad bytes) to `problems`.

    A source that holds no rows (`[]`, a CSV header alone, blank lines) is an error, as an empty file is: a
    wrong or truncated file should not train on nothing, or on the other sources alone, without a word.
    """
    known = len(problems)
    found = 0
    for record in _read_source(source, problems):
        found += 1
        yield record
    if not found and len(problems) == known:
        problems.append(Problem(source, 1, "empty file (no records)"))


def _read_source(source: str, problems: list[Problem]) -> Iterator[Record]:
    if looks_like_hub_name(source):
        yield from _read_hub(source, problems)
        return
    if not os.path.exists(source):
        problems.append(Problem(source, 0, "file not found"))
        return
    data = Path(source).read_bytes()
    if not data.strip():
        return  # `read_records` reports the empty file
    suffix = Path(source).suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(source, problems)
        return
    text = _decode(source, data, problems)
    if text is None:
        return
    if suffix == ".csv":
        yield from _read_csv(source, text, problems)
    # A .jsonl file is read line by line even when a line holds a list; other names are sniffed.
    elif suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("[")):
        yield from _read_json_array(source, text, problems)
    else:
        yield from _read_jsonl(source, text, problems)


def _decode(path: str, data: bytes, problems: list[Problem]) -> str | None:
    """UTF-8 text without its byte-order mark (editors on Windows write one; it is not part of the first row)."""
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = len(data) - len(body) + err.start
        line = data[:offset].count(b"\n") + 1
        problems.append(
            Problem(path, line, f"not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset})")
        )
        return None


def _read_csv(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    # A long transcript is one cell: the csv module's default limit (128 KiB per cell) would refuse it.
    csv.field_size_limit(CSV_CELL_LIMIT)
    reader = csv.DictReader(io.StringIO(text))
    try:
        for row in reader:
            if None in row:  # DictReader keeps the cells past the header under the key None
                found, named = len(reader.fieldnames) + len(row[None]), len(reader.fieldnames)
                problems.append(
                    Problem(path, reader.line_num, f"{found} cells, but the header names {named} columns")
                )
                continue
            yield Record(path, reader.line_num, dict(row), typed=False)
    except csv.Error as err:
        problems.append(Problem(path, reader.line_num, f"malformed CSV ({err})"))


class JSONProblem(ValueError):
    """Why a text is not readable JSON, and the line of that text where reading stopped."""

    def __init__(self, message: str, line: int = 1):
        super().__init__(message)
        self.line = line


def _parse_json(text: str) -> Any:
    """`json.loads`, with every way a parse can fail (not only bad syntax) raised as a `JSONProblem`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONProblem(f"malformed JSON ({err.msg} at column {err.colno})", err.lineno) from None
    except RecursionError:
        raise JSONProblem("malformed JSON (nested too deeply to read)") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise JSONProblem(f"malformed JSON ({str(err).partition(':')[0]})") from None


def _lone_surrogate_field(row: dict[str, Any]) -> str | None:
    """The field holding a lone UTF-16 surrogate (JSON's "\\ud83d" without its pair), if any.

    JSON allows the escape, but the string is not text: printing or tokenising it fails later, far from the data.
    """
    pending: list[tuple[str, Any]] = [("", row)]  # a loop, not recursion: a row may nest deeply
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            if any(SURROGATE.search(key) for key in value):
                return f"{where or 'row'} (a key)"
            pending.extend(
                (f"{where}.{key}" if where else key, item) for key, item in reversed(value.items())
            )
        elif isinstance(value, list):
            pending.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _check_json_row(row: Any) -> str | None:
    """Why a parsed JSON value cannot be a row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    where = _lone_surrogate_field(row)
    if where is not None:
        return f"{where}: a lone UTF-16 surrogate (\\ud800-\\udfff without its pair) is not text"
    return None


def _read_jsonl(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    # Only "\n" ends a record: str.splitlines() also splits on U+2028, U+0085 and others, which JSON strings
    # may hold raw. A "\r" before it (CRLF) is JSON whitespace.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = _parse_json(line)
        except JSONProblem as err:
            problems.append(Problem(path, number, str(err)))
            continue
        wrong = _check_json_row(row)
        if wrong is not None:
            problems.append(Problem(path, number, wrong))
            continue
        yield Record(path, number, row)


def _read_json_array(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    """A JSON file holding a list of objects (or {"data": [...]}); line numbers point at each object's start."""
    try:
        parsed = _parse_json(text)
    except JSONProblem as err:
        problems.append(Problem(path, err.line, str(err)))
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
        wrong = _check_json_row(row)
        if wrong is not None:
            problems.append(Problem(path, line, wrong))
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


def _read_parquet(path: str, problems: list[Problem]) -> Iterator[Record]:
    import pyarrow as pa  # datasets depends on pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as err:  # not Parquet, truncated, corrupt
        problems.append(Problem(path, 0, f"not a readable Parquet file ({err})"))
        return
    for index, row in enumerate(rows, start=1):
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
