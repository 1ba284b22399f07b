"""Rollout mechanics for PPO: sampling, cutting answers at EOS, and the forward passes that score tokens.

Sequences are laid out as [query (left-padded, Lq) | response (right-padded, Lr)]. Logits at position t predict
token t+1, so the response tokens are predicted by positions Lq-1 .. Lq+Lr-2. Every pass divides logits by the
sampling temperature, so the distribution we sample from is the one whose log-probs we train on.

The forward passes do no work on padding (`layout`): a micro-batch's real tokens go in packed end to end in one
row, each sequence attending only to itself (`enable_packing`, for the model families that support it), or else
padded only to the micro-batch's longest prompt and longest answer. Logits are computed only where an answer
token is predicted, and log-probabilities gathered without a full-vocabulary log-softmax.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rlhf.losses import chunked_entropy, selective_log_softmax


@dataclass
class Rollout:
    """One batch of experience. Shapes: [B, Lq] for queries, [B, Lr] for responses and per-token tensors."""

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor  # 1 up to and including the first EOS
    has_eos: Tensor  # [B] bool
    logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def select(self, index: Tensor) -> Rollout:
        return Rollout(**{k: (v[index] if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Pad to one length -> (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts are left-padded, so every answer starts at the same column."""
    return pad_batch(sequences, pad_id, side="left")


def position_ids_from(mask: Tensor) -> Tensor:
    """Positions that skip left padding, so a score does not depend on how much padding precedes it."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cut_after_eos(response_ids: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Everything after the first EOS becomes padding. -> (ids, mask incl. the EOS, has_eos [B])."""
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), response_ids.shape[1])
    mask = positions.unsqueeze(0) <= first_eos.unsqueeze(1)
    return torch.where(mask, response_ids, pad_id), mask.long(), has_eos


def check_sampling(settings) -> None:
    """Sampling settings `generate` can use (PPO's config and evaluation's share the names): a `ConfigError` at
    parse time, not a transformers error after the models have loaded."""
    from rlhf.config import ConfigError

    if not settings.temperature > 0:
        raise ConfigError(
            f"temperature: must be above 0 (sampling divides the logits by it), found {settings.temperature}"
        )
    if settings.top_k < 0:
        raise ConfigError(f"top_k: must be 0 (off) or more, found {settings.top_k}")
    if not 0 < settings.top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] (1 = off), found {settings.top_p}")
    if settings.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be at least 1, found {settings.max_new_tokens}")


@torch.no_grad()
def generate(policy: nn.Module, query_ids: Tensor, query_mask: Tensor, tokenizer, config) -> Tensor:
    """Sample responses with the KV cache. top_k 0 / top_p 1 by default so the sampled distribution is the policy's.

    Only our settings apply: transformers fills every setting not passed from the checkpoint's
    `generation_config.json` (an instruct model's `repetition_penalty`, `min_new_tokens`, `no_repeat_ngram_size`...),
    which would sample from another distribution than the one the log-prob passes score. So the model's own
    generation config is set aside for the call."""
    from transformers import GenerationConfig

    model = hf_model(policy)
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        output = policy.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            # Full length: sample past EOS (cut afterwards) rather than forbid EOS, which changes the distribution.
            eos_token_id=None if config.always_full_length else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    finally:
        model.generation_config = own
    return output[:, query_ids.shape[1] :]


# --------------------------------------------------------------------------------------------------------------
# Padding-free (packed) attention: the micro-batch's real tokens end to end in one row, attention per sequence

PACKED_ATTENTION = "rlhf_packed_sdpa"
# Entropy from a policy pass: not computed, a statistic (no gradient), or a term of the loss (with gradient).
EntropyMode = Literal["none", "stat", "loss"]
# Decoder families whose attention goes through transformers' AttentionInterface with RoPE on `position_ids` (so a
# sequence's positions restart at 0 inside a packed row), tested against the padded path in tests/test_rollout.py.
PACKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA run on each packed sequence alone (causal inside it, nothing across), as flash-attention's varlen kernel
    does on a GPU; without `cu_seq_lens_q` it is plain SDPA (generation, padded batches).

    query/key/value [1, heads, N, head_dim] for a packed row; -> ([1, N, heads, head_dim], None) like SDPA.
    Cost is sum_i L_i^2 per layer, not N^2 as a dense block-diagonal mask would be.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    if cu_seq_lens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = cu_seq_lens.tolist()
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=1), None


def _packed_sdpa_mask(*args, attention_mask: Tensor | None = None, **kwargs):
    """SDPA's mask, except for a row without a padding mask, where SDPA's causal flag (or, packed, the per-sequence
    calls above) already says everything: no [N, N] block-diagonal mask is built for a packed row."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers sit in that model's modules); else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_packing(model: nn.Module) -> bool:
    """Switch `model` (a causal LM, a scalar-head model or a PEFT wrapper of one) to packed attention when its family
    supports it and it runs on SDPA; returns whether it did. Generation and padded batches run as before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = hf_model(model)
    config = base.config
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    if config.model_type not in PACKABLE_MODEL_TYPES or not full_attention:
        return False
    if config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_sdpa_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return True


def is_packed(model: nn.Module) -> bool:
    return hf_model(model).config._attn_implementation == PACKED_ATTENTION


# --------------------------------------------------------------------------------------------------------------
# Layouts of a micro-batch: packed, or padded but trimmed to its longest real sequence


@dataclass
class Layout:
    """Model inputs for a micro-batch, and where each real response token's prediction is read.

    `positions` [P]: the columns of the model's output that predict response tokens (passed as `logits_to_keep`);
    `select` [rows, P] bool: which of those predict a real token, in the row-major order of `response_mask`, so
    `output[:, positions][select]` lines up with `response_ids[response_mask]` ([R] tokens).
    """

    inputs: dict[str, Tensor]
    positions: Tensor
    select: Tensor
    response_mask: Tensor


def layout(batch: Rollout, packed: bool) -> Layout:
    """[query (left-padded) | response (right-padded)] -> model inputs of the real tokens only: packed end to end in
    one row, or padded only to the micro-batch's longest prompt and longest answer."""
    return _packed_layout(batch) if packed else _trimmed_layout(batch)


def _packed_layout(batch: Rollout) -> Layout:
    """One row of N = sum of real lengths tokens; positions restart at 0 per sequence; `cu_seq_lens_*` [B + 1] are
    the sequence boundaries (flash-attention's names), read by `packed_sdpa_attention`."""
    response_mask = batch.response_mask.bool()
    mask = torch.cat([batch.query_mask.bool(), response_mask], dim=1)  # [B, Lq + Lr]: real tokens
    predicts = torch.zeros_like(mask)  # the token before each real response token
    start = batch.query_ids.shape[1] - 1
    predicts[:, start : start + response_mask.shape[1]] = response_mask
    lengths = mask.sum(1)
    cu_seq_lens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
    inputs = {
        "input_ids": torch.cat([batch.query_ids, batch.response_ids], dim=1)[mask].unsqueeze(0),
        "position_ids": (mask.cumsum(1) - 1)[mask].unsqueeze(0),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": int(lengths.max()),
        "max_length_k": int(lengths.max()),
    }
    positions = predicts[mask].nonzero().squeeze(1)
    select = torch.ones(1, len(positions), dtype=torch.bool, device=mask.device)
    return Layout(inputs, positions, select, response_mask)


def _trimmed_layout(batch: Rollout) -> Layout:
    """Padded [B, P + W]: P = the longest prompt (columns left of it are padding in every row), W = the longest
    answer; the answer-predicting columns P - 1 .. P + W - 2 are the same for every row."""
    response_mask = batch.response_mask.bool()
    prompt, width = int(batch.query_mask.sum(1).max()), int(response_mask.sum(1).max())
    mask = torch.cat([batch.query_mask[:, -prompt:], batch.response_mask[:, :width]], dim=1)
    inputs = {
        "input_ids": torch.cat([batch.query_ids[:, -prompt:], batch.response_ids[:, :width]], dim=1),
        "attention_mask": mask,
        "position_ids": position_ids_from(mask),
    }
    positions = torch.arange(prompt - 1, prompt - 1 + width, device=mask.device)
    return Layout(inputs, positions, response_mask[:, :width], response_mask)


def scatter_tokens(values: Tensor, response_mask: Tensor) -> Tensor:
    """[R] values of the real response tokens -> [B, Lr], 0 on padding (differentiable)."""
    out = values.new_zeros(response_mask.shape)
    out[response_mask] = values
    return out


def policy_forward(
    policy: nn.Module,
    batch: Rollout,
    temperature: float,
    entropy: EntropyMode = "none",
    lay: Layout | None = None,
):
    """Log-probs [B, Lr] of the response tokens under `policy` (0 on padding), and their entropies when `entropy`
    is "stat" (no gradient: a statistic) or "loss" (a loss term, with gradient); None for "none".

    Logits are computed only where a response token is predicted, and log-softmax only at the sampled token."""
    lay = lay or layout(batch, is_packed(policy))
    logits = policy(**lay.inputs, use_cache=False, logits_to_keep=lay.positions).logits[lay.select]  # [R, V]
    labels = batch.response_ids[lay.response_mask]
    logprobs = scatter_tokens(selective_log_softmax(logits, labels, temperature), lay.response_mask)
    if entropy == "none":
        return logprobs, None
    with torch.no_grad() if entropy == "stat" else nullcontext():
        entropies = chunked_entropy(logits, temperature)
    return logprobs, scatter_tokens(entropies, lay.response_mask)


def value_forward(value_model: nn.Module, batch: Rollout, lay: Layout | None = None) -> Tensor:
    """Per-token values [B, Lr] (0 on padding): the value head on the hidden state before each response token."""
    lay = lay or layout(batch, is_packed(value_model))
    model = hf_model(value_model)  # a LoRA value model: a reward model saved as adapter + head
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**lay.inputs, use_cache=False).last_hidden_state[:, lay.positions][lay.select]  # [R, H]
    head = model.score if hasattr(model, "score") else model.classifier
    return scatter_tokens(head(hidden).squeeze(-1).float(), lay.response_mask)


@contextmanager
def reference_of(policy: nn.Module, reference: nn.Module | None):
    """The frozen reference: a separate model, or the LoRA policy with its adapter disabled (no second copy)."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter() if hasattr(policy, "disable_adapter") else nullcontext():
            yield policy


class PolicyAndValue(nn.Module):
    """Both trained models in one module, so one optimizer (and one DeepSpeed engine) holds them."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, batch: Rollout, temperature: float, entropy: EntropyMode = "stat"):
        """-> (log-probs, entropies or None, values), each [B, Lr]; `entropy` as in `policy_forward`."""
        # One layout for both passes when both models take the same one: it is built per micro-batch, in the hot loop.
        packed = is_packed(self.policy)
        lay = layout(batch, packed) if packed == is_packed(self.value) else None
        logprobs, entropies = policy_forward(self.policy, batch, temperature, entropy, lay)
        return logprobs, entropies, value_forward(self.value, batch, lay)
