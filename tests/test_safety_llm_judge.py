"""The `llm-judge` backend on a tiny random Llama: option logits, padding, chat template."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_support import (  # noqa: E402
    RUBRIC,
    minilm_tokenizer_dir,
)

from rlhf.safety import (  # noqa: E402
    COMPLETION_CLASSES,
    PROMPT_CLASSES,
    LLMJudgeClassifier,
    RewardSourceError,
    SafetyConfig,
    SafetyReward,
    build_classifier,
    load_rubric,
)

tokenizer_dir = pytest.fixture(scope="module")(minilm_tokenizer_dir)


@pytest.fixture()
def tiny_llama(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _bias_towards(clf: LLMJudgeClassifier, letter: str, value: float = 10.0) -> None:
    """Make the judge's next-token logits depend only on a bias favouring `letter`."""
    lm = clf.model
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[clf.option_token_ids[clf.LETTERS.index(letter)]] = value
    lm.lm_head = head


def test_llm_judge_reads_the_biased_option(tiny_llama):
    clf = build_classifier(
        SafetyConfig(classifier="llm-judge", model_name_or_path=str(tiny_llama), device="cpu")
    )
    assert isinstance(clf, LLMJudgeClassifier)
    _bias_towards(clf, "C")
    assert clf.classify_prompts(["hello", "a much longer request about baking bread"]) == ["disallowed"] * 2
    # Option C is "disallowed content": a helping class, so it resolves by prompt class.
    assert clf.classify_completions(["p", "q"], ["x", "y"], ["disallowed", "allowed"]) == [
        "disallowed_content",
        "compliance",
    ]
    assert clf.last_probs.shape == (2, 4) and np.allclose(clf.last_probs.sum(axis=1), 1.0)
    assert (clf.last_probs.argmax(axis=1) == 2).all()

    clf = build_classifier(
        SafetyConfig(classifier="llm-judge", model_name_or_path=str(tiny_llama), device="cpu")
    )
    _bias_towards(clf, "B")
    assert clf.classify_prompts(["hello"]) == ["sensitive"]
    assert clf.classify_completions(["p"], ["x"], ["disallowed"]) == ["undesired_refusal"]


def test_llm_judge_answer_is_argmax_of_option_logits(tiny_llama):
    clf = LLMJudgeClassifier(str(tiny_llama), load_rubric(RUBRIC), batch_size=4, device="cpu")
    pairs = [
        ("hi", "no"),
        ("how do I bake bread?", "Mix flour, water and yeast, then bake it."),
        ("x", "y z"),
    ]
    labels = clf.classify_completions([p for p, _ in pairs], [c for _, c in pairs], ["allowed"] * 3)
    # Oracle: each question alone (no padding), full logits at the last position, best option token.
    for (p, c), label in zip(pairs, labels, strict=True):
        text = clf.render(
            clf.question(
                clf.rubric.completion_question, f"Request: {p}\n\nResponse: {c}", clf.completion_options
            )
        )
        enc = clf.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = clf.model(**enc).logits[0, -1]
        scores = torch.stack([logits[ids].max() for ids in clf.option_token_ids])
        batched = clf.option_logits([text], 4)[0]
        assert np.allclose(batched, scores.numpy(), atol=1e-4)
        expected = COMPLETION_CLASSES[int(scores.argmax())]
        assert label == ("compliance" if expected == "disallowed_content" else expected)
    # Batched with left padding gives the same option logits as one at a time.
    texts = [clf.render(f"question {i} " + "word " * (3 * i)) for i in range(4)]
    together = clf.option_logits(texts, 4)
    alone = np.concatenate([clf.option_logits([t], 4) for t in texts])
    assert np.allclose(together, alone, atol=1e-4)


def test_llm_judge_uses_chat_template(tiny_llama):
    clf = LLMJudgeClassifier(str(tiny_llama), load_rubric(RUBRIC), device="cpu")
    assert clf.render("Q?").endswith("Q?\nAnswer:")
    clf.tokenizer.chat_template = (
        "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<assistant>>"
    )
    assert clf.render("Q?") == "<<user>>Q?<<assistant>>"
    assert clf.classify_prompts(["hello"])[0] in PROMPT_CLASSES


def test_nan_judge_logits_raise_naming_the_classifier(tiny_llama):
    judge = LLMJudgeClassifier(str(tiny_llama), load_rubric(RUBRIC), device="cpu")
    _bias_towards(judge, "A", value=math.nan)
    with pytest.raises(RewardSourceError, match="'llm-judge'.*NaN"):
        SafetyReward(classifier=judge)(["a"], ["b"], categories=["allowed"])
