"""The data module: every input format normalised, every validation error with its line, loss masks."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, write_jsonl

from rlhf import data
from rlhf.data import DataError, load_demonstrations, load_preferences, load_prompts

USER, ASSISTANT = "user", "assistant"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---------------------------------------------------------------- demonstrations


def test_demonstration_formats_normalise_to_messages(tmp_path):
    rows = [
        {"messages": [msg("system", "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hello.")]},
        {"prompt": "Capital of Oslandia?", "completion": "Veltra."},
        {"prompt": [msg(USER, "Two plus two?")], "completion": [msg(ASSISTANT, "Four.")]},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"text": "\n\nHuman: How are you?\n\nAssistant: Fine.\n\nHuman: Sure?\n\nAssistant: Yes."},
    ]
    loaded, report = load_demonstrations(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert report.rows == 6 and report.kept == 6
    assert loaded[1]["messages"] == [msg(USER, "Capital of Oslandia?"), msg(ASSISTANT, "Veltra.")]
    assert loaded[3]["messages"][0]["content"] == "Translate to French\n\ncat"
    assert loaded[4]["messages"][0]["content"] == "Say hi"
    assert [m["role"] for m in loaded[5]["messages"]] == [USER, ASSISTANT, USER, ASSISTANT]
    assert loaded[5]["messages"][3]["content"] == "Yes."
    assert loaded[0]["source"].endswith("d.jsonl:1")


def test_json_csv_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.json").write_text(
        json.dumps([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}], indent=2)
    )
    (folder / "b.csv").write_text("prompt,completion\np3,c3\np4,c4\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p5", "completion": "c5"}]), folder / "c.parquet")
    loaded, report = load_demonstrations(str(folder))
    assert [r["messages"][0]["content"] for r in loaded] == ["p1", "p2", "p3", "p4", "p5"]
    assert loaded[1]["source"].endswith("a.json:6")  # the second object starts on line 6 of the indented file
    assert loaded[3]["source"].endswith("b.csv:3")


def test_a_json_object_with_lists_before_its_data_key_gives_each_row_its_line(tmp_path):
    # Lists before the rows, a nested "data", and a repeated top-level "data" (the last counts, as in json.loads).
    path = tmp_path / "wrapped.json"
    path.write_text(
        '{\n "meta": {"tags": ["x", "y"], "data": [0]},\n "data": [1],\n "notes": [[]],\n "data": [\n'
        '  {"prompt": "p1", "completion": "c1"},\n  {"prompt": "p2",\n   "completion": "c2"}\n ]\n}\n'
    )
    loaded, _ = load_demonstrations(str(path))
    assert [r["messages"][0]["content"] for r in loaded] == ["p1", "p2"]
    assert [r["source"].rpartition(":")[2] for r in loaded] == ["6", "7"]


def test_a_missing_file_named_like_a_hub_dataset_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/promts:0: no such file, nor a hub dataset that loads"):
        load_prompts("data/promts")


# ---------------------------------------------------------------- validation errors


BAD_CASES = [
    (
        "sft",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
        2,
        "malformed JSON",
    ),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant turn"),
    (
        "sft",
        '{"messages": [{"role": "robot", "content": "hi"}]}\n',
        1,
        "role: expected one of system/user/assistant, found 'robot'",
    ),
    ("sft", '{"messages": [{"role": "user", "content": 5}]}\n', 1, "content: expected a string, found int"),
    ("sft", '{"instruction": "Say hi", "output": null}\n', 1, "output: expected a string, found null"),
    ("sft", '{"foo": 1}\n', 1, "messages: missing required field"),
    ("pairs", '{"prompt": "q", "chosen": "a"}\n', 1, "rejected: missing required field"),
    ("pairs", '{"prompt": "q", "chosen": "a", "rejected": 3}\n', 1, "rejected: expected a non-empty list"),
    (
        "pairs",
        '{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 3, 1]}\n',
        1,
        "ranking: index 3 out of range",
    ),
    (
        "pairs",
        '{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}\n',
        1,
        "ranking: expected a permutation",
    ),
    ("prompts", '{"prompt": "   "}\n', 1, "prompt: blank text"),
    ("prompts", '{"messages": [{"role": "user", "content": ""}]}\n', 1, "messages[0].content: empty content"),
    ("prompts", '{"category": "allowed"}\n', 1, "prompt: missing required field"),
    # Margins are finite real numbers: not infinite, not a bool, not a string that spells a number.
    (
        "pairs",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": Infinity}\n',
        1,
        "margin: expected a finite number, found inf",
    ),
    (
        "pairs",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e400}\n',
        1,
        "margin: expected a finite number, found inf",
    ),
    (
        "pairs",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n',
        1,
        "margin: expected a finite number, found nan",
    ),
    (
        "pairs",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "high"}\n',
        1,
        "margin: expected a finite number, found str 'high'",
    ),
    (
        "pairs",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": true}\n',
        1,
        "margin: expected a finite number, found bool True",
    ),
    # A ranking's answers are answers, as a pair's are; a row is a ranking or a pair, not both.
    (
        "pairs",
        '{"prompt": "q", "responses": ["a", [{"role": "user", "content": "b"}]]}\n',
        1,
        "responses[1]: expected an assistant answer, found role 'user'",
    ),
    (
        "pairs",
        '{"prompt": "q", "responses": ["\\n\\nHuman: x\\n\\nAssistant: y", "b"]}\n',
        1,
        "responses[0]: expected an assistant answer, found role 'user'",
    ),
    (
        "pairs",
        '{"prompt": "q", "responses": ["a", "b"], "chosen": "a", "rejected": "b"}\n',
        1,
        "responses: a ranking ('responses') and a pair (chosen/rejected) in one row",
    ),
    # Categories are the README's three (PPO and evaluation read them after the models load).
    (
        "prompts",
        '{"prompt": "q", "category": "Allowed"}\n',
        1,
        "category: expected one of allowed/sensitive/disallowed or null, found 'Allowed'",
    ),
    ("prompts", '{"prompt": "q", "category": "harmful"}\n', 1, "found 'harmful'"),
    (
        "prompts",
        '{"prompt": "\\n\\nAssistant:"}\n',
        1,
        "prompt: expected a conversation ending on a user turn, found no turns",
    ),
]


@pytest.mark.parametrize("kind,content,line,message", BAD_CASES)
def test_each_problem_is_reported_with_path_and_line(tmp_path, kind, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        data.LOADERS[kind](str(path))
    first = str(caught.value.problems[0])
    assert first.startswith(f"{path}:{line}: "), first
    assert message in first


def test_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError) as caught:
        load_prompts([str(bad), str(empty)])
    messages = [str(p) for p in caught.value.problems]
    assert messages[0].startswith(f"{bad}:2: not valid UTF-8")
    assert messages[1] == f"{empty}:1: empty file (no records)"


def test_all_problems_are_collected_in_one_pass(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}, {"x": 1}, {"prompt": "fine"}])
    with pytest.raises(DataError) as caught:
        load_prompts(str(path))
    assert [p.line for p in caught.value.problems] == [2, 3]


def test_validate_command_exits_2_with_path_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"\n')
    result = run_cli("data", "validate", "--kind", "pairs", str(path))
    assert result.returncode == 2
    assert f"{path}:2: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_command_summarises_good_data(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "category": "allowed"}] * 3)
    result = run_cli("data", "validate", "--kind", "prompts", "--tokenizer", tiny_model_dir, str(path))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["examples"] == 3 and summary["categories"] == {"allowed": 3}
    assert summary["tokens"]["max"] > 5


# ---------------------------------------------------------------- degenerate rows: data, by policy


DEGENERATE_PAIRS = [
    {"prompt": "q1", "chosen": "", "rejected": "a harmful answer"},  # kept: silence was preferred
    {"prompt": "q2", "chosen": "same", "rejected": "same"},  # dropped: identical answers
    {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"},  # empty user turn
    {"prompt": "q4", "responses": ["x", "y", "x"]},  # dropped: two ranked answers are identical
    {"prompt": "q5", "chosen": "good", "rejected": "bad"},
]


def test_degenerate_pairs_are_kept_or_dropped_by_policy_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", DEGENERATE_PAIRS)
    pairs, report = load_preferences(str(path))
    assert [p["source"] for p in pairs] == [f"{path}:1", f"{path}:5"]
    assert pairs[0]["chosen"] == [msg(ASSISTANT, "")]
    assert report.counts() == {
        "rows": 5,
        "kept": 2,
        "dropped": {"empty user turn": 1, "identical answers": 2},
        "empty_answers_kept": 1,
        "truncated": 0,
    }
    assert [str(p) for p in report.dropped_at] == [
        f"{path}:2: chosen: identical to rejected",
        f"{path}:3: prompt[0].content: empty user turn",
        f"{path}:4: responses: answers 0 and 2 are identical",
    ]
    with pytest.raises(DataError) as caught:
        load_preferences(str(path), on_degenerate="error")
    assert [p.line for p in caught.value.problems] == [2, 3, 4]


def test_degenerate_demonstrations_keep_empty_answers_and_drop_empty_user_turns(tmp_path):
    rows = [
        {"messages": [msg(USER, "hi"), msg(ASSISTANT, "")]},
        {"messages": [msg(USER, "  "), msg(ASSISTANT, "x")]},
        {"instruction": "", "output": "x"},
        {"prompt": "Tell me.", "completion": ""},
    ]
    loaded, report = load_demonstrations(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [r["messages"][-1]["content"] for r in loaded] == ["", ""]
    assert report.drops == {"empty user turn": 2} and report.empty_answers == 2


def test_a_degenerate_row_does_not_hide_any_malformed_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(row) for row in DEGENERATE_PAIRS[:3]]
    lines.insert(1, '{"prompt": "q", "chosen": "a"')  # line 2: malformed JSON
    lines.insert(3, json.dumps({"prompt": "q", "chosen": "a"}))  # line 4: no rejected
    # line 6: degenerate (empty chosen) and malformed in the same row: the malformed field is still reported
    lines.insert(5, json.dumps({"prompt": "q", "chosen": "", "rejected": [{"role": "bot", "content": "x"}]}))
    lines.append(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_preferences(str(path))
    assert [(p.line, p.message.split(":")[0]) for p in caught.value.problems] == [
        (2, "malformed JSON (Expecting ',' delimiter at column 30)"),
        (4, "rejected"),
        (6, "rejected[0].role"),
        (7, "rejected"),
    ]
    assert "no assistant answer" in caught.value.problems[-1].message


def test_a_file_with_only_degenerate_rows_is_an_error_naming_them(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError) as caught:
        load_preferences(str(path))
    assert str(caught.value.problems[0]) == f"{path}:1: chosen: identical to rejected"
    assert "every row was dropped as degenerate" in str(caught.value.problems[-1])


# ---------------------------------------------------------------- preferences


def test_explicit_pairs_with_margin(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1.5}]
    )
    (pair,), _ = load_preferences(str(path))
    assert pair["prompt"] == [msg(USER, "q")]
    assert pair["chosen"] == [msg(ASSISTANT, "good")] and pair["rejected"] == [msg(ASSISTANT, "bad")]
    assert pair["margin"] == 1.5


def test_csv_margin_and_category_cells_are_text_read_by_their_column(tmp_path):
    # An empty optional cell is "not given"; a margin cell is a number written out; an empty answer stays an answer.
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("prompt,chosen,rejected,margin\nhi,a,b,\nyo,c,d,1.5\nok,,e, \n")
    pairs, report = load_preferences(str(pairs_csv))
    assert [p["margin"] for p in pairs] == [None, 1.5, None] and report.empty_answers == 1
    pairs_csv.write_text("prompt,chosen,rejected,margin\nhi,a,b,abc\nyo,c,d,inf\n")
    with pytest.raises(DataError) as caught:
        load_preferences(str(pairs_csv))
    assert [str(p) for p in caught.value.problems] == [
        f"{pairs_csv}:2: margin: expected a finite number, found str 'abc'",
        f"{pairs_csv}:3: margin: expected a finite number, found inf",
    ]
    prompts_csv = tmp_path / "prompts.csv"
    prompts_csv.write_text("prompt,category,task\nhi,,\nyo,sensitive,x\n")
    loaded, _ = load_prompts(str(prompts_csv))
    assert [(p["category"], p["task"]) for p in loaded] == [(None, ""), ("sensitive", "x")]


def test_k_way_ranking_expands_to_all_pairs_with_group_ids(tmp_path):
    rows = [
        {"prompt": "q1", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]},
        {"prompt": "q2", "responses": ["best", "worst"]},
        {"prompt": "q3", "responses": ["a", "b", "c"]},
    ]
    pairs, report = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert len(pairs) == 6 + 1 + 3 and report.rows == 3
    assert [p["group"] for p in pairs] == [0] * 6 + [1] + [2] * 3
    first = {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs if p["group"] == 0}
    assert first == {("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r3"), ("r0", "r1"), ("r3", "r1")}
    assert (pairs[6]["chosen"][0]["content"], pairs[6]["rejected"][0]["content"]) == ("best", "worst")


def test_hh_rlhf_implicit_prompt_pairs_split_at_the_turn(tmp_path):
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Well?"
    rows = [
        {
            "chosen": shared + "\n\nAssistant: The answer is 4.",
            "rejected": shared + "\n\nAssistant: The answer is 5.",
        },
        {
            "chosen": [msg(USER, "hi"), msg(ASSISTANT, "hello")],
            "rejected": [msg(USER, "hi"), msg(ASSISTANT, "go away")],
        },
    ]
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", rows)))
    # Diverging mid-turn ("The answer is 4" vs "5") must not cut the prompt inside the assistant turn.
    assert pairs[0]["prompt"] == [
        msg(USER, "What is 2+2?"),
        msg(ASSISTANT, "Let me think."),
        msg(USER, "Well?"),
    ]
    assert pairs[0]["chosen"] == [msg(ASSISTANT, "The answer is 4.")]
    assert pairs[0]["rejected"] == [msg(ASSISTANT, "The answer is 5.")]
    assert pairs[1]["prompt"] == [msg(USER, "hi")] and pairs[1]["rejected"] == [msg(ASSISTANT, "go away")]


def test_hh_prompts_ending_in_the_assistant_cue_read_as_the_whole_transcript_would(tmp_path):
    """The Dahoas rm-static layout: the prompt ends with the cue "\\n\\nAssistant:" and each answer continues it."""
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I bake bread?\n\nAssistant:"
    conversation = [msg(USER, "Hi"), msg(ASSISTANT, "Hello."), msg(USER, "How do I bake bread?")]
    rows = [
        {"prompt": prompt, "chosen": " Mix flour and water.", "rejected": " I cannot help."},
        {"chosen": prompt + " Mix flour and water.", "rejected": prompt + " I cannot help."},
        {"prompt": prompt, "responses": [" Mix flour and water.", " I cannot help."]},
    ]
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "rm_static.jsonl", rows)))
    # The split layout gives what the whole transcript gives: no empty assistant turn, no leading space.
    for pair in pairs:
        assert pair["prompt"] == conversation
        assert (pair["chosen"], pair["rejected"]) == (
            [msg(ASSISTANT, "Mix flour and water.")],
            [msg(ASSISTANT, "I cannot help.")],
        )
    sft_rows = [{"prompt": prompt, "completion": " Mix flour and water."}]
    (demo,), report = load_demonstrations(str(write_jsonl(tmp_path / "sft.jsonl", sft_rows)))
    assert demo["messages"] == conversation + [msg(ASSISTANT, "Mix flour and water.")]
    assert report.empty_answers == 0
    (row,), _ = load_prompts(str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt}])))
    assert row["prompt"] == conversation


def test_implicit_pairs_diverging_at_a_user_turn_are_rejected(tmp_path):
    row = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: X\n\nAssistant: d",
    }
    with pytest.raises(DataError, match="do not diverge at an assistant turn"):
        load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", [row])))


# ---------------------------------------------------------------- prompts


def test_prompts_keep_category_and_extra_columns(tmp_path):
    rows = [
        {"prompt": "How do I bake bread?", "category": "allowed", "task": "howto"},
        {"messages": [msg("system", "s"), msg(USER, "Dose of ibuprofen?")], "category": "sensitive"},
    ]
    loaded, _ = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert loaded[0]["prompt"] == [msg(USER, "How do I bake bread?")] and loaded[0]["task"] == "howto"
    assert loaded[1]["category"] == "sensitive" and loaded[1]["prompt"][0]["role"] == "system"


def test_a_missing_category_is_allowed_and_scored_answers_take_any_label(tmp_path):
    rows = [{"prompt": "q"}, {"prompt": "r", "category": None}, {"prompt": "s", "category": "disallowed"}]
    loaded, _ = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [r["category"] for r in loaded] == [None, None, "disallowed"]
    # The reward model never reads it: for `rlhf reward score` and `inspect reward` a category is a filter label.
    answers = [{"prompt": "q", "response": "a", "category": "refusals"}]
    (scored,), _ = data.load_scored_answers(str(write_jsonl(tmp_path / "a.jsonl", answers)))
    assert scored["category"] == "refusals"
    with pytest.raises(DataError, match="a.jsonl:1: category: expected a string, found int"):
        data.load_scored_answers(str(write_jsonl(tmp_path / "a.jsonl", [{**answers[0], "category": 3}])))


def test_prompt_must_end_on_a_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [msg(USER, "a"), msg(ASSISTANT, "b")]}])
    with pytest.raises(DataError, match="end on a user turn"):
        load_prompts(str(path))


# ---------------------------------------------------------------- masks and formatting


def test_assistant_only_labels_cover_each_assistant_turn_and_its_eos(tiny_tokenizer):
    messages = [
        msg("system", "Be brief."),
        msg(USER, "Hi"),
        msg(ASSISTANT, "Hello."),
        msg(USER, "And?"),
        msg(ASSISTANT, "Bye."),
    ]
    encoded, reason = data.tokenize_demonstration(tiny_tokenizer, messages, None, "truncate")
    assert reason is None
    trained = [i for i, label in enumerate(encoded["labels"]) if label != -100]
    text = tiny_tokenizer.decode([encoded["input_ids"][i] for i in trained])
    eos = tiny_tokenizer.eos_token
    assert text == f"Hello.{eos}Bye.{eos}"
    # the user turns and role headers are never trained on
    assert all(encoded["labels"][i] == -100 for i in range(trained[0]))


def test_empty_mask_is_an_error_or_a_counted_drop(tiny_tokenizer, monkeypatch):
    # A template that renders no assistant text leaves nothing to train on, whatever the length.
    monkeypatch.setattr(
        tiny_tokenizer,
        "chat_template",
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] + eos_token }}{% endif %}"
        "{% endfor %}",
    )
    rows = [{"messages": [msg(USER, "hi"), msg(ASSISTANT, "ok")], "source": "f.jsonl:7"}]
    with pytest.raises(DataError, match="f.jsonl:7: messages: no trainable"):
        data.tokenize_demonstrations(tiny_tokenizer, rows, None, "truncate", "error", data.Report())
    report = data.Report()
    assert data.tokenize_demonstrations(tiny_tokenizer, rows, None, "truncate", "drop", report) == []
    assert report.drops == {"no trainable (assistant) tokens": 1}


def test_a_first_user_turn_longer_than_max_length_is_over_length_not_an_empty_mask(tiny_tokenizer):
    # With the defaults (truncate, on_empty_mask: error) such a row must not block the dataset: truncating it
    # leaves no answer, so it is dropped and counted as over-length.
    rows = [
        {"messages": [msg(USER, "word " * 200), msg(ASSISTANT, "ok")], "source": "f.jsonl:7"},
        {"messages": [msg(USER, "hi"), msg(ASSISTANT, "ok")], "source": "f.jsonl:8"},
    ]
    for overflow in ("truncate", "drop"):
        report = data.Report()
        kept = data.tokenize_demonstrations(tiny_tokenizer, rows, 32, overflow, "error", report)
        assert len(kept) == 1 and report.drops == {"over max_length": 1} and report.truncated == 0


def test_over_length_is_truncated_or_dropped_and_counted(tiny_tokenizer):
    rows = [{"messages": [msg(USER, "hi"), msg(ASSISTANT, "long answer " * 50)], "source": "f:1"}]
    report = data.Report()
    (kept,) = data.tokenize_demonstrations(tiny_tokenizer, rows, 40, "truncate", "error", report)
    assert len(kept["input_ids"]) == 40 and report.truncated == 1
    report = data.Report()
    assert data.tokenize_demonstrations(tiny_tokenizer, rows, 40, "drop", "error", report) == []
    assert report.drops == {"over max_length": 1}


def test_one_prompt_format_for_every_stage(tiny_tokenizer):
    prompt = [msg(USER, "What is 3 + 4?")]
    rendered = data.render_prompt(tiny_tokenizer, prompt)
    full = data.render_conversation(tiny_tokenizer, prompt + [msg(ASSISTANT, "7")])
    assert full.startswith(rendered) and rendered.endswith("<|assistant|>\n")


def test_tokenizer_without_template_gets_the_default(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlhf.models import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    assert "<|user|>" in data.render_prompt(load_tokenizer(str(tmp_path)), [msg(USER, "x")])


def test_a_margin_may_be_a_number_a_decimal_or_a_string_that_spells_one():
    """Parquet stores decimals as Decimal (not a `numbers.Real`); some exports write numbers as strings."""
    from decimal import Decimal

    from rlhf.data.rows import preferences_from_row

    for margin in (1.5, 2, Decimal("1.5"), "1.5"):
        (pair,) = preferences_from_row({"prompt": "q", "chosen": "a", "rejected": "b", "margin": margin})
        assert pair["margin"] == float(margin)
