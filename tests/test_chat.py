"""`rlhf chat`: streams the model's greedy answer, keeps the conversation, and /reset starts a new one."""

from __future__ import annotations

import builtins

import pytest
import torch

from rlhf.chat import cli
from rlhf.data import render_prompt
from rlhf.models import load_causal_lm, load_tokenizer


def greedy_reply(model_dir: str, history: list[dict]) -> str:
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer).eval()
    inputs = tokenizer(render_prompt(tokenizer, history), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with larger random weights, so that its greedy answers are long and depend on the context."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = str(tmp_path_factory.mktemp("chatty"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_chat_streams_greedy_replies_and_reset_forgets_the_conversation(
    chatty_model_dir, monkeypatch, capsys
):
    tiny_model_dir = chatty_model_dir
    typed = iter(["What is 2 + 3?", "And 4 + 4?", "/reset", "And 4 + 4?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    assert cli([tiny_model_dir, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    replies = [part.split("\nyou>")[0].strip() for part in out.split("model> ")[1:]]
    first = greedy_reply(tiny_model_dir, [{"role": "user", "content": "What is 2 + 3?"}])
    follow_up = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And 4 + 4?"},
    ]
    assert first and replies == [
        first,
        greedy_reply(tiny_model_dir, follow_up),  # the second turn sees the first
        greedy_reply(tiny_model_dir, [{"role": "user", "content": "And 4 + 4?"}]),  # after /reset it does not
    ]


def test_chat_with_a_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert cli([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere" in err and "Traceback" not in err


def test_an_error_while_generating_ends_the_chat_instead_of_hanging(chatty_model_dir, monkeypatch):
    """generate runs in a thread feeding the stream; an error there (out of memory, past the context) left the
    reader waiting for the stream forever."""
    import transformers

    def fail(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", fail)
    typed = iter(["What is 2 + 3?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli([chatty_model_dir, "--temperature", "0", "--max-new-tokens", "8"])
