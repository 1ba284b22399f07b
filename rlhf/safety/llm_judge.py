"""The `llm-judge` backend: a causal LM answers the rubric as a multiple-choice question."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.models import check_model_dir, loading, resolve_device
from rlhf.rewards import RewardSourceError
from rlhf.safety.classifier import SafetyClassifier
from rlhf.safety.config import COMPLETION_CLASSES, PROMPT_CLASSES
from rlhf.safety.rubric import Rubric


class LLMJudgeClassifier(SafetyClassifier):
    """A causal LM answers the rubric as a multiple-choice question.

    The answer is read from the next-token logits after the question (chat template when the tokenizer has
    one): each option's score is the max logit over its letter's single-token spellings ("A", " A"); the
    class is the argmax and a softmax over the option scores gives probabilities (`last_probs`).
    """

    name = "llm-judge"
    reads_prompt = True
    LETTERS = "ABCDEFGH"

    def __init__(
        self,
        model: str | None,
        rubric: Rubric,
        batch_size: int = 8,
        device: str = "auto",
        lm: Any = None,
        tokenizer: Any = None,
    ):
        super().__init__(batch_size)
        self.device = resolve_device(device)
        if lm is None:
            check_model_dir(model, trust_remote_code=False)  # no custom code, no pickle-only weights
        with loading(model, "the judge model"):
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=False)
            self.model = lm or AutoModelForCausalLM.from_pretrained(
                model, dtype="auto", trust_remote_code=False, use_safetensors=True
            )
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # the next-token position is then the last column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.rubric = rubric
        self.prompt_options = list(PROMPT_CLASSES)
        self.completion_options = list(COMPLETION_CLASSES)
        self.option_token_ids = [
            self._letter_ids(letter) for letter in self.LETTERS[: len(self.completion_options)]
        ]
        self.last_probs: np.ndarray | None = None

    def _letter_ids(self, letter: str) -> list[int]:
        ids = {tuple(self.tokenizer.encode(s, add_special_tokens=False)) for s in (letter, " " + letter)}
        single = sorted({i[0] for i in ids if len(i) == 1})
        if not single:
            raise ValueError(f"llm-judge: the tokenizer has no single token for option letter {letter!r}")
        return single

    def question(self, header: str, body: str, classes: list[str]) -> str:
        options = "\n".join(
            f"({self.LETTERS[i]}) {self.rubric.descriptions[c]}" for i, c in enumerate(classes)
        )
        letters = ", ".join(self.LETTERS[: len(classes)])
        return f"{header}\n\n{body}\n\nOptions:\n{options}\n\nAnswer with a single letter ({letters})."

    def render(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return question + "\nAnswer:"

    @torch.no_grad()
    def option_logits(self, texts: list[str], n_options: int) -> np.ndarray:
        """[len(texts), n_options] option scores at the next position after each rendered text."""
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(
            self.device
        )
        # Left padding: positions must count real tokens only, as generate() does.
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = self.model(**enc, position_ids=position_ids, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        scores = torch.stack(
            [logits[:, ids].max(dim=-1).values for ids in self.option_token_ids[:n_options]], dim=-1
        )
        return scores.cpu().numpy()

    def _judge(self, questions: list[str], classes: list[str]) -> list[str]:
        scores = self.option_logits([self.render(q) for q in questions], len(classes))
        if not np.isfinite(scores).all():
            raise RewardSourceError(f"safety classifier {self.name!r} produced NaN or infinite option logits")
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        self.last_probs = probs / probs.sum(axis=1, keepdims=True)
        return self._argmax(self.last_probs, classes)

    def _prompt_batch(self, prompts: list[str]) -> list[str]:
        questions = [
            self.question(self.rubric.prompt_question, f"Request: {p}", self.prompt_options) for p in prompts
        ]
        return self._judge(questions, self.prompt_options)

    def _completion_batch(self, pairs: list[tuple[str, str]]) -> list[str]:
        questions = [
            self.question(
                self.rubric.completion_question, f"Request: {p}\n\nResponse: {c}", self.completion_options
            )
            for p, c in pairs
        ]
        return self._judge(questions, self.completion_options)
