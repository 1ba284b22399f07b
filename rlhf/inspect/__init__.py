"""`rlhf inspect`: what RLHF changed inside the model.

Automated interpretability (record neurons, explain them, simulate and score the explanation), the PPO-vs-SFT
diff, logit attribution with ablation, and reward attribution. Every subcommand is a module of this package with
`add_arguments(parser)` and `run(args) -> int`; `rlhf.inspect.cli` lists them.
"""

from __future__ import annotations

import json
from pathlib import Path


class InspectError(Exception):
    """Bad input to an inspect command (not a causal LM, empty data, unknown token); the message names it."""


def check_causal_lm(path: str) -> None:
    """Refuse, before loading weights, a directory whose config does not describe a causal LM (e.g. a reward model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InspectError(f"{path}: not a model checkpoint (no config.json)")
    config = json.loads(config_file.read_text())
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        architectures and not causal.intersection(architectures)
    ):
        found = ", ".join(architectures) or config.get("model_type", "unknown")
        raise InspectError(f"{path}: not a causal language model (config.json: {found})")


def load_model(path: str):
    """(model in eval mode, tokenizer) of a local causal-LM checkpoint; fp32 on CPU, safetensors only."""
    from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer

    check_causal_lm(path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer).eval()
    disable_dropout(model)
    return model, tokenizer
