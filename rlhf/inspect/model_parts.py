"""Where the units live in a Hugging Face causal LM: the one place `rlhf inspect` knows about architectures.

For each decoder layer we locate two projections that write into the residual stream:

- the MLP output projection (Llama/Qwen2 `mlp.down_proj`, GPT-2 `mlp.c_proj`): its input is the vector of MLP
  neuron activations, shape [batch, seq, n_neurons];
- the attention output projection (Llama/Qwen2 `self_attn.o_proj`, GPT-2 `attn.c_proj`): its input is the
  concatenation of the per-head outputs, shape [batch, seq, n_heads * head_dim].

Hooks on the *inputs* of these two modules are all the recording and ablation code needs, so nothing
downstream depends on how a given architecture computes its activations. Besides them: the final norm
(applied to the residual stream before the unembedding) and the unembedding itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.inspect import InspectError

# Preferred names, tried before the structural fallback (the last projection back to the hidden size).
MLP_NAMES = ("mlp", "feed_forward", "ffn")
MLP_OUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
ATTN_OUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "wo")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm")


@dataclass
class LayerParts:
    """One decoder layer's two residual writers and the sizes needed to split their inputs into units."""

    index: int
    mlp_out: nn.Module
    attn_out: nn.Module
    n_neurons: int
    n_heads: int
    head_dim: int


@dataclass
class ModelParts:
    layers: list[LayerParts]
    final_norm: nn.Module
    unembedding: nn.Module
    hidden_size: int


def _is_projection(module: nn.Module) -> bool:
    # GPT-2 style models use transformers' Conv1D: a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf


def in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.nx


def write_weight(module: nn.Module) -> torch.Tensor:
    """The projection's weight as [out (hidden), in (units)], whether nn.Linear or Conv1D."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def write_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _output_projection(block: nn.Module, names: tuple[str, ...], hidden: int) -> nn.Module | None:
    named = _child(block, names)
    if named is not None and _is_projection(named) and out_features(named) == hidden:
        return named
    # Modules register their output projection last (q, k, v, o; gate, up, down; c_fc, c_proj).
    candidates = [m for m in block.modules() if _is_projection(m) and out_features(m) == hidden]
    return candidates[-1] if candidates else None


def _decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise InspectError(f"{type(model).__name__}: no list of {n_layers} decoder layers found")


def _final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    named = _child(base, FINAL_NORM_NAMES)
    if named is not None:
        return named
    norms = [m for m in base.children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise InspectError(f"{type(model).__name__}: no final norm found")
    return norms[-1]


def _config_int(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise InspectError(f"{type(config).__name__}: none of {names} in the model config")


def locate(model: nn.Module) -> ModelParts:
    """Find every layer's MLP and attention output projections, the final norm and the unembedding.

    Raises InspectError (a user error: exit 2 from the CLI) when the model is not a decoder-only causal LM.
    """
    config = model.config
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembedding is None:
        raise InspectError(f"{type(model).__name__} is not a causal LM (it has no output embeddings)")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    n_heads = _config_int(config, "num_attention_heads", "n_head")
    layers = []
    for index, layer in enumerate(
        _decoder_layers(model, _config_int(config, "num_hidden_layers", "n_layer"))
    ):
        mlp, attn = _child(layer, MLP_NAMES), _child(layer, ATTN_NAMES)
        mlp_out = _output_projection(mlp, MLP_OUT_NAMES, hidden) if mlp is not None else None
        attn_out = _output_projection(attn, ATTN_OUT_NAMES, hidden) if attn is not None else None
        if mlp_out is None or attn_out is None:
            raise InspectError(f"{type(model).__name__} layer {index}: MLP or attention output not found")
        width = in_features(attn_out)
        head_dim = getattr(attn, "head_dim", None) or width // n_heads
        if head_dim * n_heads != width:
            raise InspectError(f"layer {index}: {width} attention features do not split into {n_heads} heads")
        layers.append(LayerParts(index, mlp_out, attn_out, in_features(mlp_out), n_heads, head_dim))
    return ModelParts(layers, _final_norm(model), unembedding, hidden)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., n_heads * head_dim] -> [..., n_heads, head_dim]."""
    return x.reshape(*x.shape[:-1], n_heads, -1)


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of each named module on every forward inside the block (the last forward wins)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_module, args, name=name):
            captured[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def unit_inputs(parts: ModelParts) -> dict[str, nn.Module]:
    """The modules whose inputs are the units: `mlp.{i}` (neurons) and `attn.{i}` (concatenated heads)."""
    modules: dict[str, nn.Module] = {}
    for layer in parts.layers:
        modules[f"mlp.{layer.index}"] = layer.mlp_out
        modules[f"attn.{layer.index}"] = layer.attn_out
    return modules


def frozen_norm(norm: nn.Module, residual: torch.Tensor):
    """The final norm as a linear map, its statistics frozen at one position's `residual` [hidden].

    This is the standard linearisation of direct logit attribution. LayerNorm: c -> w * (c - mean(c)) /
    std(residual); RMSNorm: c -> w * c / rms(residual). Summed over the parts of the residual stream this
    gives norm(residual) minus the norm's bias (returned second, or None).
    Models whose norm is neither (e.g. Gemma's 1 + w scale) fail the caller's completeness check.
    """
    centred = isinstance(norm, nn.LayerNorm) or (
        "layernorm" in type(norm).__name__.lower() and "rms" not in type(norm).__name__.lower()
    )
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6
    x = residual.float()
    if centred:
        x = x - x.mean()
    scale = torch.rsqrt(x.pow(2).mean() + eps)
    weight = norm.weight if getattr(norm, "weight", None) is not None else torch.ones(())

    def apply(c: torch.Tensor) -> torch.Tensor:
        c = c.float()
        if centred:
            c = c - c.mean(-1, keepdim=True)
        return weight.float() * c * scale

    return apply, getattr(norm, "bias", None)
