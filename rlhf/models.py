"""Loading policy, reference, reward and value models; building the tiny models tests and the demo run on.

Every model comes through `from_pretrained` with safetensors only and `trust_remote_code` off unless the config
asks for it, from a hub name or a local path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.checkpoint import read_json_object
from rlhf.data import DEFAULT_CHAT_TEMPLATE, expand_sources, read_records

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT (LoRA) adapter
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


class ModelLoadError(RuntimeError):
    """A model directory that must not be loaded as asked (custom code, pickle weights, missing files)."""


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


def read_model_config(path: str | Path) -> dict | None:
    """A local checkpoint's `config.json`, or None where there is none (a hub name, an adapter-only directory); one
    that does not parse as a JSON object is a `ModelLoadError` naming it, not a traceback."""
    config_file = Path(path) / "config.json"
    return read_json_object(config_file, ModelLoadError) if config_file.is_file() else None


def check_model_dir(path: str, trust_remote_code: bool) -> None:
    """Refuse local directories with custom code (unless trusted) or with only pickle weights, and a local path
    that does not exist (anything but a hub name `name` or `namespace/name`)."""
    if not os.path.isdir(path):
        if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
            raise ModelLoadError(f"{path}: no such model directory")
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file() and "auto_map" in read_json_object(file, ModelLoadError) and not trust_remote_code:
            raise ModelLoadError(
                f"{path}: {name} has 'auto_map' (custom code); set trust_remote_code: true to run it"
            )
    names = os.listdir(path)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    if has_pickle and not has_safetensors:  # a LoRA adapter's weights too (adapter_model.bin)
        raise ModelLoadError(f"{path}: only pickle weights (.bin/.pt); convert them to safetensors")


@contextmanager
def loading(path: str, what: str):
    """`from_pretrained` of `path`: a hub name that does not resolve (or a missing path that looks like one), or a
    directory transformers cannot read as `what` (no tokenizer files, an unknown model type) is a
    `ModelLoadError` (exit 2), not an OSError or ValueError traceback."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot load {what} ({err})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    check_model_dir(path, trust_remote_code)
    with loading(path, "a tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        # Encoders (BERT, MiniLM) have no EOS; [SEP] ends their sequences and serves as the end-of-turn token.
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos hides the real EOS from masks and from the reward model's last-token lookup.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def _resize_for(model: nn.Module, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    # Under ZeRO-3 the local shape is empty; ds_shape is the whole one.
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    if tokenizer is not None and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def _from_pretrained(auto_class: str, path: str, tokenizer, dtype: str, trust_remote_code: bool, **kwargs):
    """One loading path for every model kind; a LoRA adapter directory loads its base, then the adapter."""
    import transformers

    check_model_dir(path, trust_remote_code)
    options = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        **kwargs,
    }
    adapter = is_adapter(path)
    adapter_config = Path(path) / ADAPTER_CONFIG
    base = path
    if adapter:
        base = read_json_object(adapter_config, ModelLoadError).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ModelLoadError(
                f"{adapter_config}: base_model_name_or_path: missing (the adapter's base model)"
            )
    if base != path:
        check_model_dir(base, trust_remote_code)  # the adapter's base is held to the same rules
    with loading(base, "a model"):
        model = getattr(transformers, auto_class).from_pretrained(base, **options)
    _resize_for(model, tokenizer)
    if not adapter:
        return model
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    if config.task_type != "CAUSAL_LM":
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    # A policy saved as an adapter (SFT, merge_lora: false) is the SFT model: merged, it is what PPO starts from
    # (whole, or under a fresh LoRA: a second adapter over the same layers would take its place and leave the
    # pre-SFT base), the frozen reference, the start of a value or reward model (under its new head), and what
    # eval and inspect read.
    if hasattr(next(model.parameters()), "ds_id"):
        raise ModelLoadError(
            f"{path}: a LoRA adapter cannot be merged into a base partitioned by ZeRO-3; save the SFT model "
            "merged (merge_lora: true, the default), or load it without zero3_init_flag"
        )
    if auto_class == "AutoModelForSequenceClassification":
        config.task_type = None  # the causal-LM adapter onto a classifier's backbone
    merged = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
    # PEFT loads for inference, frozen; each stage freezes what it needs (the reference) itself.
    return merged.requires_grad_(True)


def resolve_device(device: str = "auto") -> str:
    """'auto': the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_start(field_name: str, path: str, use_lora: bool, merge_lora: bool) -> None:
    """A run starting from a LoRA adapter trains on the merged model; a fresh LoRA over it records the pre-SFT
    base as its own, so saving that LoRA unmerged would hand on an adapter that reloads onto the wrong weights."""
    from rlhf.config import ConfigError

    if use_lora and not merge_lora and is_adapter(path):
        raise ConfigError(
            f"merge_lora: {field_name} {path} is a LoRA adapter; a LoRA trained on it must be saved merged "
            "(merge_lora: true), or start from the SFT model saved merged"
        )


def load_causal_lm(
    path: str,
    tokenizer=None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
) -> nn.Module:
    model = _from_pretrained("AutoModelForCausalLM", path, tokenizer, dtype, trust_remote_code)
    return apply_lora(model, lora, task_type="CAUSAL_LM") if lora else model


SCORE_HEADS = ("score", "classifier")  # the score head of decoder / BERT-family sequence classifiers


def is_score_head(parameter_name: str) -> bool:
    """Also under PEFT, where the head is `...classifier.modules_to_save.default.weight`."""
    return any(part in SCORE_HEADS for part in parameter_name.split("."))


def load_scalar_model(
    path: str,
    tokenizer=None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    lora: LoraSettings | None = None,
    pooling: str = "model",
) -> nn.Module:
    """A one-label `AutoModelForSequenceClassification` (reward or value model); a causal-LM checkpoint gets a fresh head.

    `pooling: mean` / `last_turn` read a BERT-family encoder's score at the mean of its hidden states over every
    token / the last turn's (`rlhf.pooling`).
    """
    from rlhf.pooling import register_pooled_models, with_pooling  # transformers loads lazily, as above

    register_pooled_models()  # a mean-pooled checkpoint loads through the Auto classes
    model = _from_pretrained(
        "AutoModelForSequenceClassification", path, tokenizer, dtype, trust_remote_code, num_labels=1
    )
    model = with_pooling(model, pooling, tokenizer)
    if lora:
        # Without the score head in modules_to_save a LoRA reward model reloads with a random head (trl#1379).
        model = apply_lora(model, lora, task_type="SEQ_CLS", modules_to_save=list(SCORE_HEADS))
    return model


def apply_lora(
    model: nn.Module, lora: LoraSettings, task_type: str, modules_to_save: list[str] | None = None
):
    from peft import LoraConfig, get_peft_model

    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        modules_to_save=[m for m in (modules_to_save or []) if m in names] or None,
    )
    return get_peft_model(model, config)


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the first PPO ratio differ from 1 and the initial KL from 0. Besides `nn.Dropout` modules, an
    attention layer may copy its rate from the config into a float when built (Llama's `attention_dropout`,
    applied inside the attention kernel in train mode): those are zeroed too, the config alone is read too late."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in [n for n, v in vars(module).items() if n.endswith("dropout") and isinstance(v, float)]:
            setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in (
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
    ):
        if config is not None and hasattr(config, name):
            setattr(config, name, 0.0)


# --------------------------------------------------------------------------------------------------------------
# Tiny models


@dataclass
class TinySize:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 352
    vocab_size: int = 1024
    max_positions: int = 512


def corpus_texts(sources: list[str]) -> list[str]:
    """Every string value in the given data files, to train the tiny tokenizer on."""
    texts: list[str] = []

    def collect(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for path in expand_sources(sources):
        for record in read_records(path, problems=[]):
            collect(record.row)
    return texts


def build_tiny_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained locally, with a chat template and distinct pad and EOS tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts or ["hello world"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": TINY_SPECIAL_TOKENS[2:]})
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def init_tiny(
    output_dir: str, size: TinySize | None = None, corpus: list[str] | None = None, seed: int = 0
) -> str:
    """Write a randomly initialised Llama-architecture causal LM and its tokenizer with `save_pretrained`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    size = size or TinySize()
    tokenizer = build_tiny_tokenizer(corpus_texts(corpus or []), size.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
