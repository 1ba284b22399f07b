"""Reading files as real datasets write them: byte-order marks, raw line separators inside JSON strings, files
that hold no rows, and input that used to escape as a traceback instead of a `PATH:LINE` problem."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, write_jsonl

from rlhf.data import DataError, expand_sources, load_demonstrations, load_preferences, load_prompts

PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


def problems_of(load, path) -> list[str]:
    with pytest.raises(DataError) as caught:
        load(str(path))
    return [str(p) for p in caught.value.problems]


def test_jsonl_records_end_only_at_newlines_not_at_unicode_line_separators(tmp_path):
    # JSON strings may hold U+2028, U+2029 and U+0085 raw; str.splitlines() would cut the row there.
    path = tmp_path / "sep.jsonl"
    rows = [{**PAIR, "prompt": f"first{sep}second"} for sep in ("\u2028", "\u2029", "\x85")]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    pairs, report = load_preferences(str(path))
    assert report.rows == 3 and pairs[2]["prompt"][0]["content"] == "first\x85second"
    # Later rows keep their own line numbers, and CRLF files still read.
    path.write_text(path.read_text(encoding="utf-8") + '{"prompt": "q", "chosen": 5, "rejected": "b"}\n')
    assert problems_of(load_preferences, path) == [
        f"{path}:4: chosen: expected a non-empty list of messages, found int"
    ]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(
        b'{"prompt": "q", "chosen": "a", "rejected": "b"}\r\n\r\n{"prompt": "r", "chosen": 5}\r\n'
    )
    assert problems_of(load_preferences, crlf) == [f"{crlf}:3: rejected: missing required field"]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    bom = b"\xef\xbb\xbf"
    csv_path, jsonl_path = tmp_path / "bom.csv", tmp_path / "bom.jsonl"
    csv_path.write_bytes(bom + b"prompt,chosen,rejected\r\nhi,a,b\r\n")
    jsonl_path.write_bytes(bom + (json.dumps(PAIR) + "\n").encode())
    for path in (csv_path, jsonl_path):
        (pair,), _ = load_preferences(str(path))
        assert pair["prompt"][0]["content"] in ("hi", "q")
    # A bad byte after the mark is still reported at its own line and offset in the file.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(bom + b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert problems_of(load_prompts, bad) == [f"{bad}:2: not valid UTF-8 (byte 0xe9 at offset 35)"]


def test_a_jsonl_file_is_read_line_by_line_even_when_it_starts_with_a_list(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps([PAIR]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    assert problems_of(load_preferences, path) == [
        f"{path}:1: expected a JSON object, found list",
        f"{path}:2: rejected: missing required field",
    ]


@pytest.mark.parametrize(
    "name,content",
    [
        ("empty.json", "[]"),
        ("wrapped.json", '{"data": []}'),
        ("header.csv", "prompt,chosen,rejected\n"),
        ("blank.jsonl", "\n\n"),
        ("nothing.jsonl", ""),
    ],
)
def test_a_file_without_rows_is_the_same_error_as_an_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert problems_of(load_preferences, path) == [f"{path}:1: empty file (no records)"]


def test_directories_find_data_files_whatever_the_case_of_their_suffix(tmp_path):
    for name in ("a.JSONL", "b.Json", "c.csv", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.rpartition("/")[2] for p in expand_sources(str(tmp_path))] == ["a.JSONL", "b.Json", "c.csv"]
    write_jsonl(tmp_path / "a.JSONL", [{"prompt": "hi", "completion": "a"}])
    (demo,), _ = load_demonstrations(str(tmp_path / "a.JSONL"))
    assert demo["source"].endswith("a.JSONL:1")


def test_csv_rows_with_more_cells_than_the_header_are_errors_at_their_line(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("prompt,completion\nhi,a\nyo,b,EXTRA\n")
    assert problems_of(load_demonstrations, path) == [f"{path}:3: 3 cells, but the header names 2 columns"]


def test_a_csv_cell_may_hold_a_long_transcript(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("prompt,completion\n" + "word " * 40_000 + ",a\n")  # 200,000 characters in one cell
    (demo,), _ = load_demonstrations(str(path))
    assert len(demo["messages"][0]["content"]) == 200_000


def test_a_lone_surrogate_is_an_error_naming_its_field(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "\\ud83d hi"}, {"role": "assistant", "content": "ok"}]}\n'
        '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}\n'
    )
    assert problems_of(load_demonstrations, path) == [
        f"{path}:1: messages[0].content: a lone UTF-16 surrogate (\\ud800-\\udfff without its pair) is not text"
    ]  # line 2 holds a whole pair: the emoji, which is text


def test_json_files_too_deep_or_with_huge_integers_are_malformed_json(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert problems_of(load_preferences, deep) == [f"{deep}:1: malformed JSON (nested too deeply to read)"]
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR)[:-1] + ', "margin": ' + "9" * 5000 + "}\n")
    (problem,) = problems_of(load_preferences, huge)
    assert problem.startswith(f"{huge}:2: malformed JSON (Exceeds the limit (4300 digits)")


def test_bad_input_that_used_to_escape_as_a_traceback_exits_2_with_path_and_line(tmp_path):
    deep, huge, parquet, extra, surrogate = (
        tmp_path / name for name in ("deep.jsonl", "huge.jsonl", "bad.parquet", "extra.csv", "sur.jsonl")
    )
    deep.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    huge.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": ' + "9" * 5000 + "}\n")
    parquet.write_bytes(b"not parquet at all")
    extra.write_text("question,answer\nhi,a,EXTRA\n")
    surrogate.write_text('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n')
    files = [deep, huge, parquet, extra, surrogate]
    result = run_cli("data", "validate", "--kind", "pairs", *map(str, files))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for path, line in zip(files, (1, 1, 0, 2, 1), strict=True):
        assert f"{path}:{line}: " in result.stderr
    assert f"{parquet}:0: not a readable Parquet file" in result.stderr
