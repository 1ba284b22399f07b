"""`rlhf safety classify`: the report, written predictions, bad input exits 2."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_support import (  # noqa: E402
    COMPLETIONS,
    CONFIGS,
    PROMPTS,
    RUBRIC,
)

from rlhf.safety import (
    COMPLETION_CLASSES,
    classification_report,  # noqa: E402
    cli,
    read_labelled,
)


def test_cli_reports_metrics_and_writes_predictions(tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    assert (
        cli(["classify", "--config", str(CONFIGS / "rules.yaml"), str(COMPLETIONS), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "precision" in printed and "confusion" in printed and "ideal_refusal" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(read_labelled(COMPLETIONS)[1])
    assert all(r["predicted_label"] in COMPLETION_CLASSES for r in rows)


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"prompt": "hi", "category": "allowed"}', "{not json"], 2, "malformed JSON"),
        (['{"prompt": "hi"}', "", '{"prompt": "x", "category": "harmful"}'], 3, "category must be one of"),
        (['{"prompt": "hi", "completion": "ok"}', '{"prompt": "x"}'], 2, "mixes"),
        (['{"prompt": 3}'], 1, "expected a string"),
        (['["a list"]'], 1, "expected a JSON object"),
        (['{"prompt": "p", "completion": "c", "label": "good"}'], 1, "label must be one of"),
    ],
)
def test_cli_malformed_input_exits_2_with_path_line(tmp_path, capsys, lines, line_no, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert cli(["classify", "--config", str(CONFIGS / "rules.yaml"), str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:{line_no}:" in err and message in err
    assert "Traceback" not in err


def test_cli_bad_config_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("classifier: rules\ncolour: blue\n")
    assert cli(["classify", "--config", str(config), str(PROMPTS)]) == 2
    assert "colour" in capsys.readouterr().err
    assert cli(["classify", str(PROMPTS)]) == 2  # --config is required


def test_cli_bad_rubric_exits_2_through_the_rlhf_command(tmp_path, capsys):
    """The rubric is part of the config: a broken one stops `rlhf safety classify` with exit 2, no traceback."""
    from rlhf.cli import main

    (tmp_path / "rubric.yaml").write_text("descriptions: {}\n")
    config = tmp_path / "c.yaml"
    config.write_text("classifier: rules\nrubric_path: rubric.yaml\n")
    assert main(["safety", "classify", "--config", str(config), str(PROMPTS)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'rubric.yaml'}: unknown keys" in err and "Traceback" not in err


def test_cli_malformed_examples_file_exits_2_with_path_line(tmp_path, capsys):
    """The embedding backend's examples are read before its model loads: a bad line is PATH:LINE and exit 2."""
    (tmp_path / "examples.jsonl").write_text(
        '{"text": "I cannot help with that.", "label": "ideal_refusal"}\n{oops\n'
    )
    config = tmp_path / "c.yaml"
    config.write_text("classifier: embedding\nexamples_path: examples.jsonl\n")
    assert cli(["classify", "--config", str(config), str(PROMPTS)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'examples.jsonl'}:2: malformed JSON" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "out, message",
    [
        (".", "is a directory"),
        ("a_file/pred.jsonl", "a_file is not a directory"),
        ("a_file/deeper/pred.jsonl", "a_file is not a directory"),
    ],
)
def test_cli_unwritable_out_exits_2_before_classifying(tmp_path, capsys, monkeypatch, out, message):
    """--out is checked with the other inputs: a path that cannot be written stops before the model loads."""
    safety_cli = importlib.import_module("rlhf.safety.cli")  # the package's `cli` attribute is the function

    def forbidden(*args, **kwargs):
        pytest.fail("the classifier was built before --out was checked")

    monkeypatch.setattr(safety_cli, "build_classifier", forbidden)
    (tmp_path / "a_file").write_text("")
    out_path = tmp_path / out
    assert (
        cli(["classify", "--config", str(CONFIGS / "rules.yaml"), str(PROMPTS), "--out", str(out_path)]) == 2
    )
    err = capsys.readouterr().err
    assert "--out" in err and message in err and "Traceback" not in err


def test_cli_out_in_a_new_directory_is_created(tmp_path):
    out = tmp_path / "new" / "dir" / "pred.jsonl"
    assert cli(["classify", "--config", str(CONFIGS / "rules.yaml"), str(PROMPTS), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == len(read_labelled(PROMPTS)[1])


def test_cli_rubric_of_the_wrong_shape_exits_2(tmp_path, capsys):
    """`rules: null` in the rubric: exit 2 naming the file and key path, not a TypeError traceback."""
    doc = yaml.safe_load(RUBRIC.read_text())
    doc["prompt"]["classes"]["disallowed"]["rules"] = None
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(yaml.safe_dump(doc))
    config = tmp_path / "c.yaml"
    config.write_text("classifier: rules\nrubric_path: rubric.yaml\n")
    assert cli(["classify", "--config", str(config), str(PROMPTS)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{rubric}: prompt.classes.disallowed.rules: expected a list of rules, found null" in err
        and "Traceback" not in err
    )


def test_classification_report_counts_by_hand():
    """Per-class figures and the confusion table, counted by hand; a never-predicted class has no precision."""
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "a", "b"]
    report = classification_report(gold, pred, ["a", "b", "c"])
    assert report["n"] == 6 and report["accuracy"] == pytest.approx(3 / 6)
    assert report["per_class"]["a"] == {
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "support": 3,
    }
    assert report["per_class"]["b"] == {
        "precision": pytest.approx(1 / 3),
        "recall": pytest.approx(1 / 2),
        "support": 2,
    }
    assert report["per_class"]["c"] == {"precision": None, "recall": 0.0, "support": 1}
    assert report["confusion"] == {
        "a": {"a": 2, "b": 1, "c": 0},
        "b": {"a": 1, "b": 1, "c": 0},
        "c": {"a": 0, "b": 1, "c": 0},
    }
    json.dumps(report)  # plain Python numbers, ready for the results files
