"""Rollout mechanics for PPO: sampling, cutting answers at EOS, and the forward passes that score tokens.

Sequences are laid out as [query (left-padded, Lq) | response (right-padded, Lr)]. Logits at position t predict
token t+1, so the response tokens are predicted by positions Lq-1 .. Lq+Lr-2. Every pass divides logits by the
sampling temperature, so the distribution we sample from is the one whose log-probs we train on.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.losses import entropy_from_logits, logprobs_from_logits


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


@torch.no_grad()
def generate(policy: nn.Module, query_ids: Tensor, query_mask: Tensor, tokenizer, config) -> Tensor:
    """Sample responses with the KV cache. top_k 0 / top_p 1 by default so the sampled distribution is the policy's."""
    output = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        # Full length: sample past EOS (cut afterwards) rather than forbid EOS, which would change the distribution.
        eos_token_id=None if config.always_full_length else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    return output[:, query_ids.shape[1] :]


def sequence_inputs(batch: Rollout) -> tuple[Tensor, Tensor, Tensor]:
    input_ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    return input_ids, attention_mask, position_ids_from(attention_mask)


def policy_forward(policy: nn.Module, batch: Rollout, temperature: float, with_entropy: bool = False):
    """Log-probs [B, Lr] of the response tokens (and their entropies) under `policy`."""
    input_ids, attention_mask, position_ids = sequence_inputs(batch)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    start = batch.query_ids.shape[1] - 1
    logits = logits[:, start : start + batch.response_ids.shape[1]] / temperature
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    return logprobs, (entropy_from_logits(logits) if with_entropy else None)


def value_forward(value_model: nn.Module, batch: Rollout) -> Tensor:
    """Per-token values [B, Lr]: the value head on the hidden state before each response token."""
    input_ids, attention_mask, position_ids = sequence_inputs(batch)
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    head = value_model.score if hasattr(value_model, "score") else value_model.classifier
    values = head(hidden).squeeze(-1)
    start = batch.query_ids.shape[1] - 1
    return values[:, start : start + batch.response_ids.shape[1]].float()


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

    def forward(self, batch: Rollout, temperature: float):
        logprobs, entropy = policy_forward(self.policy, batch, temperature, with_entropy=True)
        return logprobs, entropy, value_forward(self.value, batch)
