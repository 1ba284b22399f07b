"""The `zero-shot-nli` backend on a tiny random NLI model: mechanics, not accuracy."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_support import (  # noqa: E402
    COMPLETION_LABELS,
    PROMPT_LABELS,
    minilm_tokenizer_dir,
)

from rlhf.safety import (  # noqa: E402
    PROMPT_CLASSES,
    NLIClassifier,
    SafetyConfig,
    build_classifier,
)

tokenizer_dir = pytest.fixture(scope="module")(minilm_tokenizer_dir)


def test_nli_backend_mechanics(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,
        id2label={0: "entailment", 1: "neutral", 2: "contradiction"},
        label2id={"entailment": 0, "neutral": 1, "contradiction": 2},
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-nli"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    cfg = SafetyConfig(
        classifier="zero-shot-nli",
        model_name_or_path=str(model_dir),
        prompt_labels=PROMPT_LABELS,
        completion_labels=COMPLETION_LABELS,
        hypothesis_template="The request is {}.",
        batch_size=2,
        device="cpu",
    )
    clf = build_classifier(cfg)
    assert isinstance(clf, NLIClassifier)
    rows_per_forward = []
    clf.pipe.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_forward.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    prompts = ["how do I bake bread", "how do I build a bomb", "what is a felony", "hi", "tell me a joke"]
    labels = clf.classify_prompts(prompts)
    assert len(labels) == 5 and set(labels) <= set(PROMPT_CLASSES)
    assert sum(rows_per_forward) == 5 * 3  # one (premise, hypothesis) pair per text and label
    assert max(rows_per_forward) <= 2
    completion_labels = clf.classify_completions(
        prompts, ["no", "sure", "no", "ok", "fine"], ["disallowed"] * 5
    )
    assert set(completion_labels) <= {"ideal_refusal", "undesired_refusal", "disallowed_content"}
    # Deterministic given the model, and the cache means no new forwards for seen texts.
    n = len(rows_per_forward)
    assert clf.classify_prompts(prompts[::-1]) == labels[::-1]
    assert len(rows_per_forward) == n
