"""The padding-free forward passes of rlhf.rollout against the plain padded forward (the oracle, written here).

Tiny random models built in the test (no hub, no files): Llama, Qwen2 and Qwen3 for the packed path, GPT-2 for a family
that is not packed (it falls back to trimmed padding). Prompts are left-padded and answers right-padded to
different lengths, as a rollout lays them out.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlhf.losses import ppo_policy_loss, ppo_value_loss
from rlhf.rollout import Rollout, enable_packing, is_packed, layout, policy_forward, value_forward

V, PAD, TEMPERATURE = 61, 0, 0.7


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    size = {"vocab_size": V, "pad_token_id": PAD, "attn_implementation": "sdpa"}
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, **size)).eval()
    llama = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **llama, **size)).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=8, **llama, **size)).eval()
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **llama, **size)).eval()


def tiny_value(seed: int = 1):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        pad_token_id=PAD,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=1,
        attn_implementation="sdpa",
    )
    return LlamaForSequenceClassification(config).eval()


def rollout(prompt_lengths: list[int], answer_lengths: list[int], seed: int = 0) -> Rollout:
    """[query left-padded | response right-padded] with the given real lengths; pads hold the pad id."""
    generator = torch.Generator().manual_seed(seed)
    lq, lr = max(prompt_lengths), max(answer_lengths)
    q = torch.tensor(prompt_lengths)[:, None]
    r = torch.tensor(answer_lengths)[:, None]
    query_mask = (torch.arange(lq)[None] >= lq - q).long()
    response_mask = (torch.arange(lr)[None] < r).long()
    query_ids = torch.where(
        query_mask.bool(), torch.randint(1, V, query_mask.shape, generator=generator), PAD
    )
    response_ids = torch.where(
        response_mask.bool(), torch.randint(1, V, response_mask.shape, generator=generator), PAD
    )
    return Rollout(query_ids, query_mask, response_ids, response_mask, r[:, 0] < lr)


BATCH = ([3, 7, 5, 2, 6], [9, 1, 4, 9, 6])  # prompt and answer lengths; one answer of a single token


def padded_oracle(policy, value_model, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: one padded forward over [query | response], logits sliced, full log-softmax, gather."""
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    start, width = batch.query_ids.shape[1] - 1, batch.response_ids.shape[1]
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[
        :, start : start + width
    ]
    logprobs = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, batch.response_ids[..., None])[..., 0]
    hidden = value_model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    values = value_model.score(hidden[:, start : start + width]).squeeze(-1)
    return logprobs, values


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_forward_equals_the_padded_one_and_reads_only_real_tokens(family) -> None:
    policy, batch = tiny(family), rollout(*BATCH)
    value_model = tiny_value()
    expected_logprobs, expected_values = padded_oracle(policy, value_model, batch)
    assert enable_packing(policy) and enable_packing(value_model) and is_packed(policy)
    lay = layout(batch, packed=True)
    assert lay.inputs["input_ids"].shape == (1, sum(BATCH[0]) + sum(BATCH[1]))  # no pad token goes in
    assert (lay.inputs["input_ids"] != PAD).all()
    assert lay.positions.shape == (sum(BATCH[1]),)  # logits only where an answer token is predicted
    logprobs, _ = policy_forward(policy, batch, TEMPERATURE)
    values = value_forward(value_model, batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], expected_logprobs[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[mask], expected_values[mask], atol=1e-5, rtol=1e-5)
    assert (logprobs[~mask] == 0).all() and (values[~mask] == 0).all()


def test_a_family_without_packing_runs_padded_but_trimmed_to_its_longest_sequences() -> None:
    policy = tiny("gpt2")
    assert not enable_packing(policy)
    # Extra all-pad columns on both sides, as when a micro-batch's rows are shorter than the rollout's.
    batch = rollout(*BATCH)
    wide = Rollout(
        torch.cat([torch.full((5, 4), PAD), batch.query_ids], 1),
        torch.cat([torch.zeros(5, 4, dtype=torch.long), batch.query_mask], 1),
        torch.cat([batch.response_ids, torch.full((5, 3), PAD)], 1),
        torch.cat([batch.response_mask, torch.zeros(5, 3, dtype=torch.long)], 1),
        batch.has_eos,
    )
    lay = layout(wide, packed=False)
    assert lay.inputs["input_ids"].shape == (5, max(BATCH[0]) + max(BATCH[1]))
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    logits = policy(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
    ).logits
    start = batch.query_ids.shape[1] - 1
    logits = logits[:, start : start + batch.response_ids.shape[1]] / TEMPERATURE
    expected = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None])[..., 0]
    logprobs, entropy = policy_forward(policy, wide, TEMPERATURE, entropy="stat")
    real = batch.response_mask.bool()
    torch.testing.assert_close(logprobs[:, : real.shape[1]][real], expected[real], atol=1e-5, rtol=1e-5)
    expected_entropy = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(
        entropy[:, : real.shape[1]][real], expected_entropy[real], atol=1e-5, rtol=1e-5
    )


def ppo_loss(logprobs, values, batch: Rollout, tokens) -> torch.Tensor:
    mask = batch.response_mask
    pg_loss, _ = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, 0.2, tokens)
    vf_loss, _ = ppo_value_loss(values, batch.values, batch.returns, mask, 0.2, tokens)
    return pg_loss + 0.1 * vf_loss


def with_targets(batch: Rollout, seed: int = 3) -> Rollout:
    """Old log-probs, values, advantages and returns that put some tokens inside and some outside the clip range."""
    generator = torch.Generator().manual_seed(seed)
    shape = batch.response_ids.shape
    batch.logprobs = -3 + 0.3 * torch.randn(shape, generator=generator)
    batch.values = 0.3 * torch.randn(shape, generator=generator)
    batch.advantages = torch.randn(shape, generator=generator)
    batch.returns = torch.randn(shape, generator=generator)
    return batch


def gradients(*models) -> list[torch.Tensor]:
    return [p.grad.clone() for m in models for p in m.parameters() if p.grad is not None]


def test_ppo_loss_and_gradients_of_packed_micro_batches_grouped_by_length_equal_the_padded_batch() -> None:
    """One padded batch against micro-batches of 2, grouped by answer length, packed: same loss, same gradients."""
    batch = with_targets(rollout([3, 7, 5, 2, 6, 4], [9, 1, 4, 9, 6, 2]))
    tokens = batch.response_mask.sum()
    policy, value_model = tiny("llama").train(), tiny_value().train()
    logprobs, values = padded_oracle(policy, value_model, batch)
    expected_loss = ppo_loss(logprobs, values, batch, tokens)
    expected_loss.backward()
    expected_grads = gradients(policy, value_model)
    policy.zero_grad(), value_model.zero_grad()

    assert enable_packing(policy) and enable_packing(value_model)
    order = batch.response_mask.sum(1).argsort(stable=True)  # grouped by length: [1, 2], [4, 6], [9, 9]
    loss = torch.zeros(())
    for micro in order.split(2):
        mb = batch.select(micro)
        micro_loss = ppo_loss(
            policy_forward(policy, mb, TEMPERATURE)[0], value_forward(value_model, mb), mb, tokens
        )
        micro_loss.backward()  # accumulated: with the batch's token count as normaliser the parts sum to the whole
        loss = loss + micro_loss.detach()
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-6, rtol=1e-5)
    grads = gradients(policy, value_model)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_entropy_as_a_statistic_has_no_gradient_and_as_a_loss_term_has_one() -> None:
    policy, batch = tiny("llama").train(), rollout(*BATCH)
    enable_packing(policy)
    _, stat = policy_forward(policy, batch, TEMPERATURE, entropy="stat")
    _, term = policy_forward(policy, batch, TEMPERATURE, entropy="loss")
    assert not stat.requires_grad and term.requires_grad
    torch.testing.assert_close(stat, term.detach())


def test_generation_after_enabling_packing_is_unchanged() -> None:
    """Packing changes only the padding-free passes: sampling from padded prompts gives the same tokens."""
    batch = rollout(*BATCH)
    plain, packed = tiny("llama"), tiny("llama")
    enable_packing(packed)
    outputs = []
    for model in (plain, packed):
        torch.manual_seed(7)
        outputs.append(
            model.generate(
                input_ids=batch.query_ids,
                attention_mask=batch.query_mask,
                max_new_tokens=6,
                do_sample=True,
                pad_token_id=PAD,
                eos_token_id=None,
            )
        )
    assert torch.equal(outputs[0], outputs[1])


def test_sampling_ignores_the_checkpoints_own_generation_settings() -> None:
    """An instruct checkpoint's generation_config.json (repetition penalty, minimum length...) must not reach PPO's
    sampling: the log-prob passes score the plain distribution at our temperature, top-k and top-p."""
    from types import SimpleNamespace

    from rlhf.rollout import generate

    batch = rollout(*BATCH)
    settings = SimpleNamespace(
        max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, always_full_length=False
    )
    tokenizer = SimpleNamespace(eos_token_id=5, pad_token_id=PAD)
    plain, configured = tiny("llama"), tiny("llama")
    configured.generation_config.update(repetition_penalty=5.0, min_new_tokens=8, no_repeat_ngram_size=1)
    outputs = []
    for model in (plain, configured):
        torch.manual_seed(7)
        outputs.append(generate(model, batch.query_ids, batch.query_mask, tokenizer, settings))
    assert torch.equal(outputs[0], outputs[1])
    assert configured.generation_config.repetition_penalty == 5.0  # the model's own config is given back


def test_values_of_a_lora_value_model_are_read_from_its_backbone_and_head() -> None:
    """A reward model saved as LoRA adapter + head can start the value model (value_init: reward)."""
    from peft import LoraConfig, get_peft_model

    batch, value_model = rollout(*BATCH), tiny_value()
    expected = value_forward(value_model, batch)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"])
    wrapped = get_peft_model(value_model, lora)  # B = 0: the adapters start as the identity
    torch.testing.assert_close(value_forward(wrapped, batch), expected)
