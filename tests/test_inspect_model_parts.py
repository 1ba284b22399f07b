"""Locating the units in tiny Llama, Qwen2 and GPT-2 models built from configs (random weights, no hub)."""

from __future__ import annotations

import pytest
import torch

from rlhf.inspect import InspectError
from rlhf.inspect.model_parts import (
    capture_inputs,
    frozen_norm,
    locate,
    split_heads,
    unit_inputs,
    write_bias,
    write_weight,
)

SIZES = dict(vocab_size=50, hidden=32, layers=2, heads=4, inner=48)


def tiny(kind: str):
    import transformers as tf

    v, h, n, a, i = SIZES.values()
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=v, n_embd=h, n_layer=n, n_head=a, n_inner=i))
    else:
        # Grouped-query attention (2 key/value heads for 4 query heads) in both.
        sizes = dict(
            vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=i
        )
        config_class, model_class = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[kind]
        model = model_class(config_class(**sizes, num_key_value_heads=2))
    torch.manual_seed(0)
    for p in model.parameters():
        # Non-trivial norm weights and biases, so the checks below cannot pass on default ones/zeros.
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_locates_units_that_rebuild_the_residual_stream(kind):
    model = tiny(kind)
    parts = locate(model)
    assert len(parts.layers) == SIZES["layers"] and parts.hidden_size == SIZES["hidden"]
    for layer in parts.layers:
        assert (layer.n_neurons, layer.n_heads, layer.head_dim) == (SIZES["inner"], SIZES["heads"], 8)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 7))
    with capture_inputs(unit_inputs(parts)) as acts, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    # The residual stream is the embedding plus what every layer's two projections write: rebuilt from the
    # captured unit activations alone, then the final norm and unembedding must give the model's logits.
    residual = out.hidden_states[0][0, -1].clone()
    for layer in parts.layers:
        for module, key in ((layer.attn_out, f"attn.{layer.index}"), (layer.mlp_out, f"mlp.{layer.index}")):
            heads = (
                split_heads(acts[key][0, -1], layer.n_heads) if key.startswith("attn") else acts[key][0, -1]
            )
            assert heads.shape[0] == (layer.n_heads if key.startswith("attn") else layer.n_neurons)
            bias = write_bias(module)
            residual += write_weight(module) @ heads.reshape(-1) + (bias if bias is not None else 0)
    logits = parts.unembedding(parts.final_norm(residual))
    torch.testing.assert_close(logits, out.logits[0, -1], rtol=1e-4, atol=1e-4)
    # The frozen-scale linearisation of the norm is exact at the point it was frozen.
    linear, bias = frozen_norm(parts.final_norm, residual)
    normed = linear(residual) + (bias if bias is not None else 0)
    torch.testing.assert_close(normed, parts.final_norm(residual), rtol=1e-4, atol=1e-4)


def test_a_model_without_output_embeddings_is_refused():
    import transformers as tf

    model = tf.LlamaModel(
        tf.LlamaConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
        )
    )
    with pytest.raises(InspectError, match="not a causal LM"):
        locate(model)
