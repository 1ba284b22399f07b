"""Where an encoder reward model reads its score: mean pooling for BERT-family encoders.

`AutoModelForSequenceClassification` scores BERT at [CLS] through its pretrained pooler. Sentence-transformers
encoders (all-MiniLM-L6-v2) were trained to mean-pool instead: their [CLS] state never learnt to summarise a text.
`pooling: mean` in the reward stage reads the score at the mean of the last hidden states over real tokens. The
class is registered with the Auto classes (`register_pooled_models`, called by `rlhf.models` before it loads a
scalar model), so a saved checkpoint reloads through `from_pretrained` like any other, with no remote code.
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

POOLINGS = ("model", "mean")


class BertMeanPooledConfig(BertConfig):
    model_type = "rlhf_bert_mean_pooled"


class BertMeanPooledForSequenceClassification(BertForSequenceClassification):
    """BERT's score head read at the mean of the last hidden states over real (unmasked) tokens."""

    config_class = BertMeanPooledConfig

    def __init__(self, config: BertMeanPooledConfig):
        super().__init__(config)
        self.bert.pooler = None  # unused: no idle parameters for DDP to wait on

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> SequenceClassifierOutput:
        kwargs.pop("labels", None)  # the reward stage computes its own loss
        hidden = self.bert(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [batch, hidden]
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def register_pooled_models() -> None:
    AutoConfig.register(BertMeanPooledConfig.model_type, BertMeanPooledConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(
        BertMeanPooledConfig, BertMeanPooledForSequenceClassification, exist_ok=True
    )


def with_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """`model` scoring as asked: 'model' leaves it as loaded; 'mean' moves a BERT's weights to mean pooling."""
    if pooling == "model" or isinstance(model, BertMeanPooledForSequenceClassification):
        return model
    if not isinstance(model, BertForSequenceClassification):
        raise ModelLoadError(f"pooling: 'mean' needs a BERT-family encoder, found {type(model).__name__}")
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    pooled = BertMeanPooledForSequenceClassification(BertMeanPooledConfig(**settings))
    pooled.load_state_dict({k: v for k, v in model.state_dict().items() if ".pooler." not in k})
    weight = next(model.parameters())
    return pooled.to(device=weight.device, dtype=weight.dtype)
