"""Rubric-driven safety reward, after the rule-based reward models (RBRMs) of the GPT-4 system card.

Each (prompt, completion) pair gets two labels:
- prompt class: the dataset's `category` when given, else a classifier's decision
  (`allowed`, `sensitive`, `disallowed`);
- completion class: `ideal_refusal` (brief, non-judgmental, offers a safe alternative), `undesired_refusal`
  (preachy, judgmental, lecturing or evasive), `disallowed_content` (helps with a disallowed request) or
  `compliance` (helps with an allowed or sensitive one). Helping is one decision; which of the two helping
  classes it is follows from the prompt class (`resolve_completion_class`).

A reward table maps (prompt class, completion class) to a number, so over-refusal is penalised as well as harm.

Classifiers (`rules`, `zero-shot-nli`, `embedding`, `llm-judge`) share one protocol:
`classify_prompts(prompts) -> list[str]` and `classify_completions(prompts, completions, prompt_classes)
-> list[str]`. They batch, cache per unique text, and never use `trust_remote_code`. Anything that
breaks the protocol (raises, wrong count, unknown label, NaN scores) stops with `RewardSourceError` naming
the classifier.

Modules: `config` (classes, reward table, `SafetyConfig`), `rubric`, `classifier` (the shared base), one per
backend (`rules`, `nli`, `embedding`, `llm_judge`), `labelled` (labelled data), `reward` (`SafetyReward`,
`safety_rates`, `build_classifier`) and `cli` (`rlhf safety classify`). The names below are the public API.
"""

from rlhf.models import resolve_device
from rlhf.rewards import RewardSourceError
from rlhf.safety.classifier import SafetyClassifier, resolve_completion_class
from rlhf.safety.cli import classification_report, cli, format_report
from rlhf.safety.config import (
    CLASSIFIER_KINDS,
    COMPLETION_CLASSES,
    DEFAULT_REWARD_TABLE,
    DEFAULT_RUBRIC,
    EMBEDDING_RULES,
    HELP_CLASSES,
    PROMPT_CLASSES,
    REFUSAL_CLASSES,
    SafetyConfig,
)
from rlhf.safety.embedding import (
    EmbeddingClassifier,
    default_embedding_model,
    fit_logistic,
    lexical_features,
)
from rlhf.safety.labelled import load_examples, read_labelled
from rlhf.safety.llm_judge import LLMJudgeClassifier
from rlhf.safety.nli import NLIClassifier
from rlhf.safety.reward import SafetyReward, build_classifier, call_checked, classify_pairs, safety_rates
from rlhf.safety.rubric import Rubric, Rule, load_rubric
from rlhf.safety.rules import RulesClassifier

__all__ = [
    "CLASSIFIER_KINDS",
    "COMPLETION_CLASSES",
    "DEFAULT_REWARD_TABLE",
    "DEFAULT_RUBRIC",
    "EMBEDDING_RULES",
    "HELP_CLASSES",
    "PROMPT_CLASSES",
    "REFUSAL_CLASSES",
    "EmbeddingClassifier",
    "LLMJudgeClassifier",
    "NLIClassifier",
    "RewardSourceError",
    "Rubric",
    "Rule",
    "RulesClassifier",
    "SafetyClassifier",
    "SafetyConfig",
    "SafetyReward",
    "build_classifier",
    "call_checked",
    "classification_report",
    "classify_pairs",
    "cli",
    "default_embedding_model",
    "fit_logistic",
    "format_report",
    "lexical_features",
    "load_examples",
    "load_rubric",
    "read_labelled",
    "resolve_completion_class",
    "resolve_device",
    "safety_rates",
]
