"""`rlhf inspect diff`: a planted change is ranked first, direct effects add up to the logits, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from rlhf.cli import main
from rlhf.inspect.diff import ALL, Totals, compare, rank, trace
from rlhf.inspect.model_parts import locate

CHANGED_LAYER, CHANGED_NEURON = 1, 7
PROMPTS = [
    {"prompt": "What is 3 + 4?", "category": "allowed"},
    {"prompt": "What is 10 + 12?", "category": "allowed"},
    {"prompt": "How do I pick a lock?", "category": "disallowed"},
    {"prompt": "What is 1 + 1?"},
]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from rlhf.inspect import load_model

    before, tokenizer = load_model(tiny_model_dir)
    after, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        # Triple one neuron of the last layer: nothing else in the model reads it, so no other unit changes.
        after.model.layers[CHANGED_LAYER].mlp.up_proj.weight[CHANGED_NEURON] *= 3.0
    return before, after, tokenizer


@pytest.fixture(scope="module")
def after_dir(models, tmp_path_factory) -> str:
    _, after, tokenizer = models
    path = tmp_path_factory.mktemp("after")
    after.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sequence(tokenizer) -> tuple[list[int], int]:
    from rlhf.data import render_prompt

    prompt = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": "What is 2 + 5?"}]))["input_ids"]
    answer = tokenizer("2 + 5 = 7.<|end|>", add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


def test_direct_effects_of_all_units_and_the_embedding_add_up_to_the_centred_logits(models):
    model, _, tokenizer = models
    ids, start = sequence(tokenizer)
    parts = locate(model)
    traced = trace(model, parts, ids, start)
    totals = Totals()
    compare((parts, parts), (traced, traced), totals, start)
    units = sum(float(sums["effect_before"].sum()) for sums in totals.sums.values())
    embedding = model.get_input_embeddings().weight[ids[start - 1 : -1]]
    from_embedding = float((embedding.detach() * traced.readout).sum())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : -1]
    centred = logits.gather(1, torch.tensor(ids[start:])[:, None])[:, 0] - logits.mean(-1)
    assert units + from_embedding == pytest.approx(float(centred.sum()), rel=1e-4, abs=1e-4)
    # The same model on both sides changes nothing.
    assert all(float(sums["change"].abs().max()) < 1e-5 for sums in totals.sums.values())


def test_the_changed_neuron_ranks_first_and_nothing_else_moves(models):
    before, after, tokenizer = models
    ids, start = sequence(tokenizer)
    parts = (locate(before), locate(after))
    totals = Totals(tokens=len(ids), answer_tokens=len(ids) - start)
    compare(parts, (trace(before, parts[0], ids, start), trace(after, parts[1], ids, start)), totals, start)
    ranked = rank({ALL: totals}, top=3)[ALL]
    first = ranked["neurons_by_activation"][0]
    assert first["unit"] == f"L{CHANGED_LAYER}.N{CHANGED_NEURON}" and first["activation_change"] > 0
    assert ranked["neurons_by_activation"][1]["activation_change"] == pytest.approx(0.0, abs=1e-6)
    assert ranked["heads_by_activation"][0]["activation_change"] == pytest.approx(0.0, abs=1e-6)
    # Tripling the activation triples the neuron's write; its direct effect moves with it (up to the norm's scale).
    assert first["effect_after"] == pytest.approx(3 * first["effect_before"], rel=0.2)
    assert ranked["neurons_by_effect"][0]["unit"] == first["unit"]


def test_diff_command_writes_json_and_page_per_category(tmp_path, after_dir, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "diff"
    argv = [
        "inspect",
        "diff",
        "--before",
        tiny_model_dir,
        "--after",
        str(after_dir),
        "--prompts",
        str(prompts),
    ]
    assert main([*argv, "--out", str(out), "--top", "3", "--max-new-tokens", "8"]) == 0
    result = json.loads((out / "diff.json").read_text())
    assert set(result["categories"]) == {"allowed", "disallowed", ALL}
    for category in result["categories"].values():
        top = category["neurons_by_activation"][0]
        assert top["unit"] == f"L{CHANGED_LAYER}.N{CHANGED_NEURON}"
        assert isinstance(top["explanation_after"], str) and -1.0 <= top["score_after"] <= 1.0
    assert {c: v["prompts"] for c, v in result["categories"].items()} == {
        "allowed": 2,
        "disallowed": 1,
        ALL: 4,
    }
    page = (out / "diff.html").read_text()
    assert "disallowed" in page and f"L{CHANGED_LAYER}.N{CHANGED_NEURON}" in page
    assert main([*argv, "--out", str(out), "--per-category", "1", "--max-new-tokens", "4"]) == 0
    result = json.loads((out / "diff.json").read_text())
    assert {c: v["prompts"] for c, v in result["categories"].items()} == {
        "allowed": 1,
        "disallowed": 1,
        ALL: 3,
    }


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    from rlhf.models import load_scalar_model, load_tokenizer

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    reward = tmp_path / "reward"
    load_scalar_model(tiny_model_dir, load_tokenizer(tiny_model_dir)).save_pretrained(reward)
    for before, after, data, expected in (
        (tiny_model_dir, tiny_model_dir, empty, "empty"),
        (tiny_model_dir, str(reward), prompts, "not a causal language model"),
    ):
        capsys.readouterr()
        argv = ["inspect", "diff", "--before", before, "--after", after, "--prompts", str(data)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err


def test_report_summary_links_the_page_and_names_each_category_top_neuron(
    tmp_path, after_dir, tiny_model_dir
):
    from rlhf.inspect.diff import report_summary

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    summary = report_summary(tiny_model_dir, after_dir, str(prompts), tmp_path / "inspect", per_category=1)
    assert summary["page"] == "inspect/diff.html" and (tmp_path / summary["page"]).exists()
    assert set(summary["top"]) == {"allowed", "disallowed", ALL}
    assert summary["top"]["disallowed"]["neuron"]["unit"] == f"L{CHANGED_LAYER}.N{CHANGED_NEURON}"
    assert summary["top"]["disallowed"]["head"]["unit"].startswith("L")


def test_report_links_the_inspect_page_with_table_safe_explanations():
    from rlhf.report import inspect_lines

    row = {
        "unit": "L0.N1",
        "effect_before": 0.1,
        "effect_after": 0.25,
        "explanation_after": 'tokens "<|end|>" (1.00)',
        "score_after": 0.5,
    }
    top = {"disallowed": {"neuron": row, "head": {**row, "unit": "L1.H0"}}}
    text = "\n".join(inspect_lines({"page": "inspect/diff.html", "per_category": 3, "top": top}))
    assert "](inspect/diff.html)" in text and "first 3 held-out prompts" in text
    rows = [line for line in text.splitlines() if line.startswith("| disallowed |")]
    # A token like <|end|> must not split the table row: 5 unescaped bars per row.
    assert len(rows) == 2 and all(line.replace("\\|", "").count("|") == 5 for line in rows)
    assert "+0.100 → +0.250" in rows[0] and inspect_lines(None) == []
