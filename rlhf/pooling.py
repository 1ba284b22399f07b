"""Where an encoder reward model reads its score: mean pooling for BERT-family encoders.

`AutoModelForSequenceClassification` scores BERT at [CLS] through its pretrained pooler. Sentence-transformers
encoders (all-MiniLM-L6-v2) were trained to mean-pool instead: their [CLS] state never learnt to summarise a text.
`pooling: mean` in the reward stage reads the score at the mean of the last hidden states over real tokens;
`pooling: last_turn` at their mean over the last turn only (the answer being judged), while every token still
attends to the whole conversation. A mean over a long conversation is mostly prompt, which the chosen and the
rejected answer share, so the two pooled states barely differ. The last turn is what follows the second-to-last
end-of-turn token (the tokenizer's EOS, which ends every turn in the chat template); a text with one turn is
pooled whole. The class is registered with the Auto classes (`register_pooled_models`, called by `rlhf.models`
before it loads a scalar model), so a saved checkpoint reloads through `from_pretrained` like any other, with no
remote code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from rlhf.models import ModelLoadError

POOLINGS = ("model", "mean", "last_turn")


class BertMeanPooledConfig(BertConfig):
    model_type = "rlhf_bert_mean_pooled"

    def __init__(self, pool_last_turn: bool = False, eot_token_id: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pool_last_turn = pool_last_turn
        self.eot_token_id = eot_token_id


def last_turn_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """[batch, seq] mask of the real tokens after the second-to-last end of turn (all of them if there is none).

    A run of end-of-turn tokens is one end: BERT's tokenizer appends its [SEP] after the template's own. Counting
    ends from the right, the last turn is where at most one end starts at or after a position.
    """
    eot = (input_ids == eot_token_id) & attention_mask.bool()
    follows_eot = torch.nn.functional.pad(eot[:, :-1], (1, 0), value=False)
    ends = eot & ~follows_eot
    ends_from_here = ends.flip(1).cumsum(1).flip(1)
    return attention_mask.bool() & (ends_from_here <= 1)


class BertMeanPooledForSequenceClassification(BertForSequenceClassification):
    """BERT's score head read at the mean of the last hidden states over real (unmasked) tokens, or over the
    last turn's (`config.pool_last_turn`)."""

    config_class = BertMeanPooledConfig

    def __init__(self, config: BertMeanPooledConfig):
        super().__init__(config)
        self.bert.pooler = None  # unused: no idle parameters for DDP to wait on

    def forward(
        self, input_ids=None, attention_mask=None, turn_ids=None, **kwargs
    ) -> SequenceClassifierOutput:
        """`turn_ids`: with `inputs_embeds` (attribution), the token ids that mark where the last turn starts."""
        kwargs.pop("labels", None)  # the reward stage computes its own loss
        hidden = self.bert(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        if self.config.pool_last_turn:
            turn_ids = input_ids if input_ids is not None else turn_ids
            if turn_ids is None:
                raise ValueError(
                    "pool_last_turn: the last turn is found in token ids; pass turn_ids with inputs_embeds"
                )
            attention_mask = last_turn_mask(turn_ids, attention_mask, self.config.eot_token_id)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [batch, hidden]
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def register_pooled_models() -> None:
    AutoConfig.register(BertMeanPooledConfig.model_type, BertMeanPooledConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(
        BertMeanPooledConfig, BertMeanPooledForSequenceClassification, exist_ok=True
    )


def with_pooling(model: nn.Module, pooling: str, tokenizer=None) -> nn.Module:
    """`model` scoring as asked: 'model' leaves it as loaded; 'mean' and 'last_turn' move a BERT's weights to
    mean pooling (over every token, or over the last turn's, which ends with `tokenizer`'s EOS)."""
    if pooling == "model" or isinstance(model, BertMeanPooledForSequenceClassification):
        return model
    if not isinstance(model, BertForSequenceClassification):
        raise ModelLoadError(
            f"pooling: {pooling!r} needs a BERT-family encoder, found {type(model).__name__}"
        )
    if pooling == "last_turn" and getattr(tokenizer, "eos_token_id", None) is None:
        raise ModelLoadError("pooling: 'last_turn' needs a tokenizer with an EOS (end-of-turn) token")
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    if pooling == "last_turn":
        settings.update(pool_last_turn=True, eot_token_id=tokenizer.eos_token_id)
    pooled = BertMeanPooledForSequenceClassification(BertMeanPooledConfig(**settings))
    pooled.load_state_dict({k: v for k, v in model.state_dict().items() if ".pooler." not in k})
    weight = next(model.parameters())
    return pooled.to(device=weight.device, dtype=weight.dtype)
