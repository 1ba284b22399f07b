"""`rlhf inspect`: what RLHF changed inside the model.

Automated interpretability (record neurons, explain them, simulate and score the explanation), the PPO-vs-SFT
diff, logit attribution with ablation, and reward attribution. Every subcommand is a module of this package with
`add_arguments(parser)` and `run(args) -> int`; `rlhf.inspect.cli` lists them.
"""

from __future__ import annotations


class InspectError(Exception):
    """Bad input to an inspect command (not a causal LM, empty data, unknown token); the message names it."""


def model_config(path: str) -> dict:
    """`path`'s config.json; a directory without one is not a checkpoint an inspect command can read."""
    from rlhf.models import read_model_config

    config = read_model_config(path)
    if config is None:
        raise InspectError(f"{path}: not a model checkpoint (no config.json)")
    return config


def check_causal_lm(path: str) -> None:
    """Refuse, before loading weights, a directory whose config does not describe a causal LM (e.g. a reward model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model_config(path)
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
