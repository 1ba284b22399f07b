"""Explain, simulate, score: a planted neuron is found and scores >= 0.9; neurons with no token pattern score ~0."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import arithmetic_dialogues, write_jsonl

from rlhf.cli import main
from rlhf.inspect.explain import (
    NO_PATTERN,
    Excerpt,
    LLMExplainer,
    LLMSimulator,
    correlation,
    discretise,
    format_features,
    parse_features,
    score_explanation,
    split_excerpts,
    token_explainer,
    token_simulator,
)

PLANTED_LAYER, PLANTED_NEURON = 1, 5


def test_correlation_of_a_flat_simulation_is_zero():
    assert correlation([0, 1, 2], [3, 3, 3]) == 0.0
    assert correlation([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert correlation([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)


def test_explanation_text_round_trips_tokens_with_quotes_spaces_and_pairs():
    weights = {(None, ' "quoted"'): 1.0, ("\n", " x"): 0.5, (None, "\t"): 0.25}
    text = format_features(weights)
    assert parse_features(text) == weights
    assert token_simulator(text, [[" y", ' "quoted"', "\n", " x", " x"]]) == [[0.0, 1.0, 0.0, 0.5, 0.0]]
    assert parse_features(NO_PATTERN) == {}


def random_text(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def test_token_explainer_finds_a_token_that_fires_only_after_another():
    rng = random.Random(0)
    vocab = [" a", " b", " c", " d", " e", " f"]

    def excerpt() -> Excerpt:
        tokens = random_text(rng, vocab, 24)
        acts = [1.0 if t == " b" and i and tokens[i - 1] == " a" else 0.0 for i, t in enumerate(tokens)]
        return Excerpt(tokens, acts)

    excerpts = sorted((excerpt() for _ in range(200)), key=lambda e: -max(e.activations))
    (top, rand), held_out = split_excerpts(excerpts[:20], excerpts[100:120])
    explanation = token_explainer(top, rand)
    assert parse_features(explanation) == {(" a", " b"): 1.0}
    assert score_explanation(token_simulator, explanation, held_out) == pytest.approx(1.0)


def test_noise_that_no_token_predicts_scores_near_zero_on_held_out_excerpts():
    # The explainer always finds some tokens that happened to co-occur with high noise in the excerpts it reads;
    # scoring on held-out excerpts is what exposes them.
    rng = random.Random(1)
    vocab = [f" w{i}" for i in range(50)]
    scores = []
    for _ in range(10):
        excerpts = [
            Excerpt(random_text(rng, vocab, 32), [rng.random() for _ in range(32)]) for _ in range(300)
        ]
        excerpts.sort(key=lambda e: -max(e.activations))
        (top, rand), held_out = split_excerpts(excerpts[:20], rng.sample(excerpts, 20))
        scores.append(score_explanation(token_simulator, token_explainer(top, rand), held_out))
    assert abs(np.mean(scores)) < 0.1 and max(abs(s) for s in scores) < 0.25


# --------------------------------------------------------------------------------------------------------------
# Neurons of real (tiny) models, through the commands


def plant_token_neuron(model, token_id: int) -> None:
    """Make neuron PLANTED_NEURON of layer PLANTED_LAYER fire on `token_id` and on nothing else.

    Hidden dimension 0 carries a flag: the planted token's embedding is 1 there and every other embedding 0, and
    no layer writes into it, so after the norm it is large exactly at that token. The neuron's gate and up rows
    read only that dimension, so silu(x0) * x0 is large there and exactly 0 everywhere else.
    """
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 0.0
        embed[token_id, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        mlp = model.model.layers[PLANTED_LAYER].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[PLANTED_NEURON] = 0.0
            proj.weight[PLANTED_NEURON, 0] = 1.0


def mixed_dialogues(n: int) -> list[dict]:
    """Additions (with ' +') and subtractions / products (without), so the planted token is not everywhere."""
    rows = arithmetic_dialogues(n // 2)
    rng = random.Random(3)
    for _ in range(n - n // 2):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        op, value = rng.choice([("minus", a - b), ("times", a * b)])
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} {op} {b}?"},
                    {"role": "assistant", "content": f"It is {value}."},
                ]
            }
        )
    rng.shuffle(rows)
    return rows


def run(argv: list[str]) -> None:
    assert main(["inspect", *argv]) == 0


def test_planted_neuron_is_explained_by_its_token_with_score_at_least_0_9(tmp_path, tiny_model_dir):
    from rlhf.inspect import load_model

    model, tokenizer = load_model(tiny_model_dir)
    ids = tokenizer("1 + 2", add_special_tokens=False)["input_ids"]
    plus = next(i for i in ids if tokenizer.decode([i]) == " +")
    plant_token_neuron(model, plus)
    planted = tmp_path / "planted"
    model.save_pretrained(planted)
    tokenizer.save_pretrained(planted)
    data = write_jsonl(tmp_path / "dialogues.jsonl", mixed_dialogues(160))
    unit = f"L{PLANTED_LAYER}.N{PLANTED_NEURON}"
    run(["neurons", "--model", str(planted), "--data", str(data), "--out", str(tmp_path / "rec")])
    run(
        [
            "explain",
            "--neurons",
            str(tmp_path / "rec"),
            "--units",
            unit,
            "L0.N3",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    results = {r["unit"]: r for r in json.loads((tmp_path / "x/explanations.json").read_text())["units"]}
    features = parse_features(results[unit]["explanation"])
    assert list(features) == [(None, " +")] and features[(None, " +")] > 0.9
    assert results[unit]["score"] >= 0.9
    assert unit in (tmp_path / "x/explanations.html").read_text()


def test_random_weight_neurons_score_near_zero(tiny_model_dir):
    """Random weights at unit scale (std 1/sqrt(fan_in), not the 0.02 of a fresh HF init) mix the context chaotically:
    no token predicts a neuron, and held-out scores must say so.

    At a fresh HF init the residual stream is the current token's embedding, so every neuron is a token detector
    and its token explanation is genuinely predictive (scores around 0.5): that is not a random neuron.
    """
    from rlhf.inspect import load_model
    from rlhf.inspect.neurons import record

    model, tokenizer = load_model(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=1.0 if "embed" in name else 3.0 / p.shape[1] ** 0.5)
    # Random token sequences: a chat template would put the same tokens at the same positions, which even a
    # chaotic network answers the same way every time (a real, explainable pattern).
    rng = random.Random(0)
    excerpts = [[rng.randrange(len(tokenizer)) for _ in range(32)] for _ in range(300)]
    rec = record(model, tokenizer, excerpts, top_k=20, n_random=20)
    scores = []
    for neuron in range(0, 128, 8):
        (top, rand), held_out = split_excerpts(*rec.excerpts(f"L1.N{neuron}"))
        scores.append(score_explanation(token_simulator, token_explainer(top, rand), held_out))
    assert abs(np.mean(scores)) < 0.15


# --------------------------------------------------------------------------------------------------------------
# The LLM explainer and simulator: prompt format and reading of the number distribution


def test_llm_explainer_prompt_shows_top_excerpts_on_the_0_to_10_scale(tiny_model_dir):
    from rlhf.inspect import load_model

    explainer = LLMExplainer(*load_model(tiny_model_dir), max_new_tokens=4)
    top = [Excerpt([" cat", " sat"], [2.0, 0.6]), Excerpt([" dog"], [1.0])]
    # The tiny tokenizer spells the preamble byte by byte: its 512 positions hold the first excerpt only.
    assert " cat\t10\n sat\t3\n" in explainer.prompt(top) and " dog" not in explainer.prompt(top)
    explainer.model.config.max_position_embeddings = 2048
    prompt = explainer.prompt(top)
    assert " cat\t10\n sat\t3\n<end>\n<start>\n dog\t5\n<end>\n" in prompt
    assert prompt.endswith("the main thing this neuron does is find")
    assert discretise([-1.0, 0.04, 4.0], 4.0) == [0, 0, 10]
    assert isinstance(explainer(top, []), str)


class NumberLM(torch.nn.Module):
    """A stand-in LM whose next-token distribution puts all mass on one token id."""

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.token_id, self.vocab = token_id, vocab
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 50.0
        return SimpleNamespace(logits=logits)


def test_llm_simulator_reads_the_expected_number_at_every_token(tiny_tokenizer):
    simulator = LLMSimulator(None, tiny_tokenizer)
    numbers = simulator.number_ids()
    assert len(set(numbers.values())) == len(numbers) and 7 in numbers
    simulator.model = NumberLM(numbers[7], len(tiny_tokenizer))
    tokens = [" 1", " +", " 2", "\n"]
    ids, reads = simulator.prompt_ids("plus signs", tokens)
    assert (
        len(reads) == len(tokens)
        and tiny_tokenizer.decode(ids[reads[0] + 1 : reads[1] + 1]) == "unknown\n +\t"
    )
    predicted = simulator("plus signs", [tokens, tokens[:2]])
    assert [len(p) for p in predicted] == [4, 2]
    assert all(p == pytest.approx(7.0, abs=1e-3) for row in predicted for p in row)


def test_explain_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from test_inspect_neurons import DigitTokenizer, tiny

    from rlhf.inspect.neurons import record

    record(tiny("llama"), DigitTokenizer(), [[1, 2, 3, 4], [5, 6, 7]], top_k=1, n_random=1).save(
        tmp_path / "rec"
    )
    for argv, expected in (
        (["--neurons", str(tmp_path / "missing")], "not a neuron recording"),
        (["--neurons", str(tmp_path / "rec"), "--units", "L9.N0"], "L9.N0 is not in the recording"),
        (["--neurons", str(tmp_path / "rec"), "--units", "mlp.0.1"], "expected L<layer>.N<neuron>"),
        (["--neurons", str(tmp_path / "rec"), "--explainer", "llm"], "needs --explainer-model"),
    ):
        capsys.readouterr()
        assert main(["inspect", "explain", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err


def test_the_held_out_excerpts_never_include_one_the_explanation_was_written_from():
    """The random sample is shared by all units and may hold a unit's top excerpts (here "a" and "b")."""
    ex = {name: Excerpt([name], [1.0]) for name in "abcdwxyz"}
    top = [ex["a"], ex["b"], ex["c"], ex["d"]]  # explain from a, c; score on b, d
    random_ = [ex["b"], ex["w"], ex["x"], ex["a"], ex["y"], ex["z"]]  # explain from b, w, x; score on a, y, z
    (explain_top, explain_random), held_out = split_excerpts(top, random_)
    explained = {e.tokens[0] for e in explain_top + explain_random}
    assert explained == {"a", "c", "w", "x"}
    assert [e.tokens[0] for e in held_out] == ["b", "d", "y", "z"]
    assert not explained & {e.tokens[0] for e in held_out}


def test_the_check_summary_median_of_an_even_count_is_the_mean_of_the_middle_two():
    from rlhf.inspect.logit_diff import summarise_checks

    def report(fraction: float) -> dict:
        check = {"top": {"fraction_removed": fraction}, "smallest": {"fraction_removed": 0.0}}
        return {"check": {"total": check, "direct": check}}

    assert summarise_checks([report(0.2), report(0.8)])["total"]["median_top_removed"] == pytest.approx(0.5)
