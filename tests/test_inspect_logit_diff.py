"""`rlhf inspect logit-diff`: exact attribution, planted units found and ablated, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from rlhf.cli import main as rlhf_main
from rlhf.inspect import InspectError
from rlhf.inspect.logit_diff import (
    Unit,
    ablated,
    ablation_effect,
    attribute,
    encode_prompt,
    greedy_units,
    logit_diff,
    parse_unit,
    ranking_check,
    single_token,
    smallest_units,
    top_units,
    total_effects,
    unit_means,
)
from rlhf.inspect.model_parts import capture_inputs, locate, split_heads, unit_inputs, write_weight
from rlhf.models import load_causal_lm

PROMPT = "What is 7 + 5?"


@pytest.fixture()
def model(tiny_model_dir, tiny_tokenizer):
    return load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()


def tokens(tokenizer) -> tuple[int, int]:
    return single_token(tokenizer, "1", "--target"), single_token(tokenizer, "2", "--distractor")


def test_parts_sum_to_the_logit_difference(model, tiny_tokenizer):
    parts = locate(model)
    ids = encode_prompt(tiny_tokenizer, PROMPT, raw=False)
    result = attribute(model, parts, ids, *tokens(tiny_tokenizer))
    assert result["logit_diff"] == pytest.approx(logit_diff(model, ids, *tokens(tiny_tokenizer)), abs=1e-5)
    assert result["sum_of_parts"] == pytest.approx(result["logit_diff"], abs=1e-4)
    n_units = sum(layer.n_heads + layer.n_neurons for layer in parts.layers)
    assert len(result["units"]) == n_units


def test_gpt2_parts_with_biases_and_layernorm_sum_to_the_logit_difference():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 40, (1, 6))
    result = attribute(model, locate(model), ids, 3, 5)
    assert {"L0.attn_bias", "L1.mlp_bias", "final_norm_bias"} <= set(result["other"])
    assert result["sum_of_parts"] == pytest.approx(result["logit_diff"], abs=1e-3)


def plant(model, parts, ids, target, distractor, strength: float = 8.0) -> list[Unit]:
    """Make head 1 of each layer and 3 last-layer neurons write `strength` along U[target] - U[distractor].

    Planted in forward order, re-reading the activations after each: a plant changes everything downstream.
    """

    def activations(key: str) -> torch.Tensor:
        with capture_inputs(unit_inputs(parts)) as acts, torch.no_grad():
            model(ids)
        return acts[key][0, -1]

    unembed = parts.unembedding.weight
    direction = (unembed[target] - unembed[distractor]).detach()
    direction = direction / direction.norm()
    planted = []
    with torch.no_grad():
        for layer in parts.layers:
            z = split_heads(activations(f"attn.{layer.index}"), layer.n_heads)[1]
            columns = slice(layer.head_dim, 2 * layer.head_dim)
            write_weight(layer.attn_out)[:, columns] = strength * torch.outer(direction, z) / z.dot(z)
            planted.append(Unit(layer.index, "head", 1))
        last = parts.layers[-1]
        neurons = activations(f"mlp.{last.index}")
        for n in neurons.abs().argsort(descending=True)[:3].tolist():
            write_weight(last.mlp_out)[:, n] = strength * direction / neurons[n]
            planted.append(Unit(last.index, "neuron", n))
    return planted


def test_planted_units_rank_on_top_and_their_ablation_removes_the_difference(model, tiny_tokenizer):
    parts = locate(model)
    ids = encode_prompt(tiny_tokenizer, PROMPT, raw=False)
    target, distractor = tokens(tiny_tokenizer)
    planted = plant(model, parts, ids, target, distractor)
    result = attribute(model, parts, ids, target, distractor)
    result["total"] = total_effects(model, parts, ids, target, distractor)
    for scores in (result["units"], result["total"]):
        assert set(top_units(scores, 1.0)) == set(planted)
    # Greedy re-estimation may prefer an upstream unit that feeds a planted neuron (it is worth more, amplified
    # by the plant): the set may differ, what it removes may not.
    greedy = greedy_units(model, parts, ids, target, distractor)
    for top, scores in ((top_units(result["units"], 1.0), result["units"]), (greedy, result["total"])):
        check = ranking_check(
            model, parts, ids, top, smallest_units(scores), result, None, target, distractor
        )
        assert check["top"]["fraction_removed"] >= 0.5
        assert abs(check["smallest"]["fraction_removed"]) < 0.5


def test_estimated_ablation_effect_matches_the_measured_one(model, tiny_tokenizer):
    """Layer-0 units act mostly through layer 1: the estimate must follow those paths, not just the direct one."""
    parts = locate(model)
    ids = encode_prompt(tiny_tokenizer, PROMPT, raw=False)
    target, distractor = tokens(tiny_tokenizer)
    before = logit_diff(model, ids, target, distractor)
    estimated = total_effects(model, parts, ids, target, distractor)
    neurons = sorted(
        (u for u in estimated if u.layer == 0 and u.kind == "neuron"), key=lambda u: -abs(estimated[u])
    )
    # Neurons enter layer 1 almost linearly; heads through attention and norms, so first order is rougher.
    for unit, tolerance in [(u, 0.05) for u in neurons[:5]] + [(Unit(0, "head", h), 0.3) for h in (0, 1)]:
        measured = before - ablation_effect(model, parts, ids, [unit], None, target, distractor)
        assert estimated[unit] == pytest.approx(measured, rel=tolerance, abs=1e-3)
    # With frozen weights the graph starts at the first unit module; the estimates must not change.
    model.requires_grad_(False)
    frozen = total_effects(model, parts, ids, target, distractor)
    assert max(abs(frozen[u] - estimated[u]) for u in estimated) < 1e-6


def test_mean_ablation_sets_exactly_the_chosen_columns(model, tiny_tokenizer):
    parts = locate(model)
    references = [encode_prompt(tiny_tokenizer, p, raw=False) for p in ("What is 1 + 1?", "Hello there")]
    means = unit_means(model, parts, references)
    ids = encode_prompt(tiny_tokenizer, PROMPT, raw=False)
    units = [Unit(0, "neuron", 5), Unit(1, "head", 0)]
    with capture_inputs(unit_inputs(parts)) as clean, torch.no_grad():
        model(ids)
    with ablated(parts, units, means), capture_inputs(unit_inputs(parts)) as acts, torch.no_grad():
        model(ids)
    head_dim = parts.layers[1].head_dim
    torch.testing.assert_close(acts["mlp.0"][0, :, 5], means["mlp.0"][5].expand(ids.shape[1]))
    torch.testing.assert_close(
        acts["attn.1"][0, :, :head_dim], means["attn.1"][:head_dim].expand(ids.shape[1], -1)
    )
    # Layer 0's heads are upstream of nothing ablated, so they are untouched; layer 0's other neurons too.
    torch.testing.assert_close(acts["attn.0"], clean["attn.0"])
    torch.testing.assert_close(acts["mlp.0"][0, :, 6:], clean["mlp.0"][0, :, 6:])


def test_unit_names_are_checked_against_the_model(model):
    parts = locate(model)
    assert parse_unit("L1.N17", parts) == Unit(1, "neuron", 17)
    for bad in ("L9.H0", "L0.H7", "layer0", "L0.X1"):
        with pytest.raises(InspectError):
            parse_unit(bad, parts)


def test_cli_runs_and_refuses_a_multi_token_target(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["inspect", "logit-diff", "--model", tiny_model_dir, "--prompt", PROMPT, "--out", str(out)]
    assert rlhf_main([*argv, "--target", "1", "--distractor", "2", "--ablate", "L0.H0", "L1.N3"]) == 0
    assert (out / "logit_diff.json").exists() and (out / "logit_diff.html").read_text().startswith(
        "<!doctype"
    )
    capsys.readouterr()
    assert rlhf_main([*argv, "--target", "zzqx", "--distractor", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target 'zzqx' is not one token" in err[0]


def test_cli_mean_ablation_reads_the_reference_prompts(tiny_model_dir, tmp_path, capsys):
    reference = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "What is 3 + 4?"}, {"prompt": "Hi"}])
    argv = ["inspect", "logit-diff", "--model", tiny_model_dir, "--prompt", PROMPT, "--out", str(tmp_path)]
    argv += ["--target", "1", "--distractor", "2", "--ablation", "mean"]
    assert rlhf_main(argv) == 2  # no --reference
    assert "--reference" in capsys.readouterr().err
    assert rlhf_main([*argv, "--reference", str(reference)]) == 0


def test_cli_over_a_prompts_file_summarises_the_check(tiny_model_dir, tmp_path, capsys):
    prompts = [{"prompt": "What is 3 + 4?", "category": "x"}, {"prompt": "Hi", "category": "y"}]
    prompts.append({"prompt": "What is 9 + 1?", "category": "x"})
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    argv = [
        "inspect",
        "logit-diff",
        "--model",
        tiny_model_dir,
        "--prompts",
        str(data),
        "--out",
        str(tmp_path),
    ]
    argv += ["--target", "1", "--distractor", "2"]
    assert rlhf_main([*argv, "--category", "x"]) == 0
    report = json.loads((tmp_path / "logit_diff.json").read_text())
    assert [p["prompt"] for p in report["prompts"]] == ["What is 3 + 4?", "What is 9 + 1?"]
    assert report["summary"]["prompts"] == 2 and set(report["summary"]) == {"prompts", "total", "direct"}
    capsys.readouterr()
    assert rlhf_main([*argv, "--category", "z"]) == 2
    assert "no prompt has category 'z'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["not_a_model", "reward_model", "empty_prompts", "bad_unit", "unknown_unit"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from rlhf.models import load_scalar_model

    model_dir, extra = tiny_model_dir, ["--prompt", PROMPT]
    if case == "not_a_model":
        model_dir = str(tmp_path)
    elif case == "reward_model":
        model_dir = str(tmp_path / "rm")
        load_scalar_model(tiny_model_dir, tiny_tokenizer).save_pretrained(model_dir)
        tiny_tokenizer.save_pretrained(model_dir)
    elif case == "empty_prompts":
        extra = ["--prompts", str(write_jsonl(tmp_path / "empty.jsonl", []))]
    elif case == "bad_unit":
        extra += ["--ablate", "layer0"]
    else:
        extra += ["--ablate", "L7.N0"]
    argv = ["inspect", "logit-diff", "--model", model_dir, *extra, "--target", "1", "--distractor", "2"]
    capsys.readouterr()
    assert rlhf_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    if case != "unknown_unit":  # refused before the model loads: nothing else printed
        assert len(err) == 1
    else:
        assert "the model has 2 layers" in err[-1]
