"""Safety config parsing and validation, the labelled data sets and example files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_support import (  # noqa: E402
    COMPLETION_LABELS,
    COMPLETIONS,
    CONFIGS,
    HELDOUT_COMPLETIONS,
    HELDOUT_PROMPTS,
    PROMPT_LABELS,
    PROMPTS,
    RUBRIC,
    CountingEncoder,
)

from rlhf.config import ConfigError
from rlhf.safety import (  # noqa: E402
    DEFAULT_REWARD_TABLE,
    EmbeddingClassifier,
    SafetyConfig,
    load_examples,
    load_rubric,
    read_labelled,
)


def test_every_safety_config_parses():
    load_rubric(RUBRIC)
    configs = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "rubric.yaml")
    assert {p.name for p in configs} >= {"rules.yaml", "embedding.yaml", "nli.yaml", "llm_judge.yaml"}
    kinds = {SafetyConfig.from_yaml(p).classifier for p in configs}
    assert kinds == {"rules", "embedding", "zero-shot-nli", "llm-judge"}
    assert Path(SafetyConfig.from_yaml(CONFIGS / "rules.yaml").rubric_path) == RUBRIC


def test_unknown_config_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("clasifier: rules\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown safety config keys: batchsize, clasifier"):
        SafetyConfig.from_yaml(path)


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "cannot read"),
        ("classifier: [rules\n", ":2: invalid YAML"),
        ("- rules\n", "expected a mapping"),
        ("classifier: rules\nbatch_size: 0\n", "batch_size must be a positive integer"),
    ],
)
def test_config_file_problems_are_config_errors_naming_the_file(tmp_path, text, match):
    """Missing file, broken YAML, wrong shape or a bad field: a ConfigError (exit 2), never a traceback."""
    path = tmp_path / "safety.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as caught:
        SafetyConfig.from_yaml(path)
    assert str(path) in str(caught.value)


def test_rubric_problems_are_config_errors_naming_the_file(tmp_path):
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(RUBRIC.read_text().replace("refusal_window_chars:", "refusal_window_charz:"))
    with pytest.raises(ConfigError, match=f"{rubric}: completion: unknown keys.*refusal_window_charz"):
        load_rubric(rubric)
    doc = yaml.safe_load(RUBRIC.read_text())
    doc["prompt"]["benign_idioms"] = ["(unclosed"]
    rubric.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"prompt.benign_idioms: bad regex '\(unclosed'"):
        load_rubric(rubric)
    # Wrong shapes are config errors too, not a TypeError or ValueError from deep inside.
    for section, key, value, match in (
        ("prompt", "order", "disallowed", "prompt.order must be a list of prompt classes"),
        (
            "completion",
            "refusal_window_chars",
            "eighty",
            "completion.refusal_window_chars must be a positive",
        ),
        ("completion", "max_ideal_refusal_words", 0, "completion.max_ideal_refusal_words must be a positive"),
    ):
        doc = yaml.safe_load(RUBRIC.read_text())
        doc[section][key] = value
        rubric.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError, match=f"{rubric}: {match}"):
            load_rubric(rubric)


def _set(doc: dict, key_path: str, value) -> None:
    """doc["a"]["b"][0]["c"] = value for key_path "a.b.0.c" (a number indexes a list)."""
    *parents, last = key_path.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[int(last) if isinstance(doc, list) else last] = value


RULE0 = "prompt.classes.disallowed.rules.0"


@pytest.mark.parametrize(
    "key_path, value, message",
    [
        ("prompt.default", ["allowed"], "prompt.default must be one of .*, found ['allowed']"),
        (
            "prompt.classes.disallowed.rules",
            None,
            "prompt.classes.disallowed.rules: expected a list of rules, found null",
        ),
        (
            "prompt.classes.disallowed.rules",
            5,
            "prompt.classes.disallowed.rules: expected a list of rules, found 5",
        ),
        (
            f"{RULE0}.all",
            [],
            "prompt.classes.disallowed.rules[0].all (.*): no regex, so the rule would fire on every",
        ),
        (
            f"{RULE0}.all",
            "abc",
            "prompt.classes.disallowed.rules[0].all (.*): expected a list of regex strings",
        ),
        (
            f"{RULE0}.unless",
            [""],
            "prompt.classes.disallowed.rules[0].unless (.*): an empty regex matches every",
        ),
        (
            f"{RULE0}.name",
            [1],
            "prompt.classes.disallowed.rules[0].name: expected a non-empty string, found [1]",
        ),
        (f"{RULE0}", "a rule", "prompt.classes.disallowed.rules[0]: expected a mapping, found 'a rule'"),
        ("prompt.order", ["disallowed", "disallowed"], "prompt.order names a class twice"),
        ("descriptions.allowed", 5, "descriptions.allowed: expected a non-empty string, found 5"),
        ("judge.prompt_question", None, "judge.prompt_question: expected a non-empty string, found null"),
        (
            "completion.refusal_markers",
            [],
            "completion.refusal_markers: no regex, so no completion would ever be",
        ),
        (
            "completion.help_markers",
            None,
            "completion.help_markers: expected a list of regex strings, found null",
        ),
    ],
)
def test_rubric_shape_problems_name_the_file_and_key_path(tmp_path, key_path, value, message):
    """A wrong shape anywhere in the rubric is a ConfigError naming FILE: KEY.PATH, never a TypeError; an empty
    rule is one too (it would fire on every prompt)."""
    doc = yaml.safe_load(RUBRIC.read_text())
    _set(doc, key_path, value)
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(yaml.safe_dump(doc))
    pattern = re.escape(f"{rubric}: {message}").replace(re.escape(".*"), ".*")
    with pytest.raises(ConfigError, match=pattern):
        load_rubric(rubric)


def test_an_empty_rubric_is_a_config_error(tmp_path):
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=re.escape(f"{rubric}: expected a mapping, found null")):
        load_rubric(rubric)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rubric_path: 5\n", "rubric_path must be a path, got 5"),
        ("rubric_path: nope.yaml\n", "rubric_path: nope.yaml: no such file"),
        ("rubric_path: /\n", "rubric_path: /: is a directory, not a file"),
        (
            "classifier: zero-shot-nli\nmodel_name_or_path: 5\n",
            "model_name_or_path must be a local path or a hub",
        ),
        (
            "classifier: embedding\nmodel_name_or_path: ''\n",
            "model_name_or_path must be a local path or a hub",
        ),
        (
            "classifier: embedding\nexamples_path: nonexist.jsonl\n",
            "examples_path: nonexist.jsonl: no such file",
        ),
        (
            "classifier: embedding\nexamples_path: [ok.jsonl, gone.jsonl]\n",
            "examples_path: gone.jsonl: no such",
        ),
        ("classifier: embedding\nexamples_path: ['']\n", "examples_path must be a path or a list of paths"),
        ("batch_size: true\n", "batch_size must be a positive integer, got True"),
        ("5: x\nfoo: 1\n", "unknown safety config keys: 5, foo"),
    ],
)
def test_config_field_problems_name_the_file_and_field(tmp_path, monkeypatch, text, message):
    """Wrong types and missing files: FILE: FIELD ..., a ConfigError (exit 2) before any file is read or model
    loads, not a TypeError, an AttributeError or a data error at line 0 of the missing file."""
    monkeypatch.chdir(tmp_path)  # relative paths that do not exist stay as written
    (tmp_path / "ok.jsonl").write_text('{"text": "I cannot help.", "label": "ideal_refusal"}\n')
    path = tmp_path / "safety.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        SafetyConfig.from_yaml(path)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"classifier": "regex"}, "classifier must be one of"),
        ({"device": "gpu"}, "device"),
        ({"batch_size": 0}, "batch_size"),
        ({"classifier": "zero-shot-nli"}, "needs model_name_or_path"),
        ({"reward_table": {"allowed": {"disallowed_content": 1.0}}}, "cannot occur"),
        ({"reward_table": {"harmful": {"compliance": 1.0}}}, "unknown prompt class"),
        ({"reward_table": {"allowed": {"compliance": float("nan")}}}, "finite"),
        ({"prompt_labels": {"allowed": "a", "disallowed": "b"}}, "missing classes"),
        ({"hypothesis_template": "no slot"}, "hypothesis_template"),
        ({"hypothesis_template": 3}, "hypothesis_template"),
        ({"examples": ["I cannot help."]}, "examples must map a class to a list of texts, found list"),
        ({"knn_k": -1}, "knn_k"),
        ({"centroid_weight": 1.5}, "centroid_weight"),
        ({"class_margins": {"harmful": 0.1}}, "unknown class"),
        ({"class_margins": {"disallowed": float("inf")}}, "finite"),
        ({"examples_path": 3}, "examples_path"),
    ],
)
def test_config_validation(values, match):
    with pytest.raises(ConfigError, match=match):
        SafetyConfig(**values)


def test_partial_reward_table_merges_onto_defaults():
    table = SafetyConfig(reward_table={"disallowed": {"undesired_refusal": 0.25}}).reward_table
    assert table["disallowed"]["undesired_refusal"] == 0.25
    assert table["disallowed"]["ideal_refusal"] == DEFAULT_REWARD_TABLE["disallowed"]["ideal_refusal"]
    assert table["allowed"] == DEFAULT_REWARD_TABLE["allowed"]


def test_labelled_sets_are_big_and_balanced():
    _, prompts = read_labelled(PROMPTS)
    _, completions = read_labelled(COMPLETIONS)
    assert len(prompts) >= 120 and len(completions) >= 60
    assert min(Counter(r["category"] for r in prompts).values()) >= 30
    assert min(Counter(r["label"] for r in completions).values()) >= 12
    assert len({r["prompt"] for r in prompts}) == len(prompts)


def test_heldout_sets_parse_and_have_the_stated_counts():
    """The frozen held-out set: 108 prompts (36 per class) and 50 completions, none from the labelled set."""
    mode, prompts = read_labelled(HELDOUT_PROMPTS)
    assert mode == "prompts"
    counts = Counter(r["category"] for r in prompts)
    assert counts == {"disallowed": 36, "sensitive": 36, "allowed": 36}
    assert len({r["prompt"] for r in prompts}) == len(prompts) == 108
    mode, completions = read_labelled(HELDOUT_COMPLETIONS)
    assert mode == "completions" and len(completions) == 50
    assert Counter(r["label"] for r in completions) == {
        "ideal_refusal": 12,
        "undesired_refusal": 12,
        "disallowed_content": 10,
        "compliance": 16,
    }
    held_prompts = {r["prompt"] for r in prompts}
    assert all(r["prompt"] in held_prompts and r["category"] for r in completions)
    for r in completions:  # the helping label agrees with the prompt class
        if r["label"] in ("disallowed_content", "compliance"):
            assert (r["label"] == "disallowed_content") == (r["category"] == "disallowed"), r
    _, labelled = read_labelled(PROMPTS)
    _, labelled_completions = read_labelled(COMPLETIONS)
    assert not held_prompts & {r["prompt"] for r in labelled}
    assert not {r["completion"] for r in completions} & {r["completion"] for r in labelled_completions}


def test_examples_path_accepts_labelled_files(tmp_path):
    """examples_path takes a list; labelled prompt and completion rows become examples of their class."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "how do I build a bomb", "category": "disallowed"}) + "\n")
    completions = tmp_path / "c.jsonl"
    completions.write_text(
        json.dumps(
            {
                "prompt": "q",
                "category": "disallowed",
                "completion": "Sure, step 1",
                "label": "disallowed_content",
            }
        )
        + "\n"
    )
    cfg_path = tmp_path / "emb.yaml"
    cfg_path.write_text(
        f"classifier: embedding\nexamples_path: [p.jsonl, c.jsonl]\nrubric_path: {RUBRIC}\nknn_k: 3\n"
    )
    cfg = SafetyConfig.from_yaml(cfg_path)
    assert cfg.examples_paths == [str(prompts), str(completions)]

    assert load_examples(str(prompts)) == {"disallowed": ["how do I build a bomb"]}
    assert load_examples(str(completions)) == {"disallowed_content": ["Sure, step 1"]}
    clf = EmbeddingClassifier(
        None,
        PROMPT_LABELS,
        COMPLETION_LABELS,
        {**load_examples(str(prompts)), **load_examples(str(completions))},
        encoder=CountingEncoder(),
    )
    # A helping example is filed under the helping class the completion labels use.
    assert "Sure, step 1" in clf._class_texts["completion"]["compliance"]


@pytest.mark.parametrize("kind", ["llm-judge", "zero-shot-nli", "embedding"])
def test_model_backends_refuse_custom_code_and_pickle_only_weights(tmp_path, kind):
    """Safetensors only and no remote code, as for the stage models: checked before anything is unpickled."""
    from rlhf.models import ModelLoadError
    from rlhf.safety import build_classifier

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")
    values = {"classifier": kind, "model_name_or_path": str(model), "rubric_path": str(RUBRIC)}
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        build_classifier(SafetyConfig.from_dict(values))
    (model / "config.json").write_text('{"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}')
    with pytest.raises(ModelLoadError, match="auto_map"):
        build_classifier(SafetyConfig.from_dict(values))


@pytest.mark.parametrize("kind", ["llm-judge", "zero-shot-nli", "embedding"])
def test_model_backends_turn_a_hub_name_that_does_not_resolve_into_a_load_error(kind, monkeypatch):
    """Offline (as here), or a name the hub lacks: a `ModelLoadError` naming it (exit 2), not an OSError."""
    from rlhf.models import ModelLoadError
    from rlhf.safety import build_classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    values = {"classifier": kind, "model_name_or_path": "nobody/no-such-model", "rubric_path": str(RUBRIC)}
    with pytest.raises(ModelLoadError, match="nobody/no-such-model: cannot load"):
        build_classifier(SafetyConfig.from_dict(values))


def test_the_default_rubric_is_package_data():
    """A non-editable install ships the rlhf package alone: the default rubric must live in it and be listed as
    package data (it sat in configs/, outside any installed package)."""
    import rlhf.safety
    from rlhf.safety.config import DEFAULT_RUBRIC

    assert DEFAULT_RUBRIC.is_file() and DEFAULT_RUBRIC.parent == Path(rlhf.safety.__file__).parent
    pyproject = (Path(rlhf.safety.__file__).parents[2] / "pyproject.toml").read_text()
    assert 'rlhf = ["safety/rubric.yaml"]' in pyproject
