"""Recording neuron activations: the streamed top-k against a one-excerpt-at-a-time oracle, storage, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl

from rlhf.cli import main
from rlhf.inspect.model_parts import capture_inputs, locate, unit_inputs
from rlhf.inspect.neurons import Recording, make_excerpts, read_documents, record


class DigitTokenizer:
    """Token i is the string f"t{i}"; enough for `record`, which only decodes ids and pads."""

    pad_token_id = 0

    def decode(self, ids: list[int]) -> str:
        return f"t{ids[0]}"


def tiny(kind: str):
    import transformers as tf

    small = dict(vocab_size=60, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=24, **small))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=16, intermediate_size=24, **small))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_inner=24))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_streamed_top_k_matches_one_excerpt_at_a_time(kind):
    torch.manual_seed(0)
    model = tiny(kind)
    rng = random.Random(0)
    excerpts = [[rng.randrange(1, 60) for _ in range(rng.randint(3, 12))] for _ in range(23)]
    # Batches of 4 with padding and a running top-k must keep exactly what a plain loop over excerpts finds.
    rec = record(model, DigitTokenizer(), excerpts, top_k=5, n_random=6, heads=True, batch_size=4)
    parts = locate(model)
    for layer in range(2):
        per_excerpt = []
        for ids in excerpts:
            with capture_inputs(unit_inputs(parts)) as captured, torch.no_grad():
                model(torch.tensor([ids]))
            per_excerpt.append(captured[f"mlp.{layer}"][0])  # [T, neurons]
        for neuron in (0, 7, 23):
            peaks = torch.tensor([acts[:, neuron].max() for acts in per_excerpt])
            # Ranked at the stored precision, equal peaks by excerpt index (the record's documented order).
            expected = peaks.to(torch.bfloat16).sort(descending=True, stable=True).indices[:5].tolist()
            top, rand = rec.excerpts(f"L{layer}.N{neuron}")
            assert [e.tokens for e in top] == [[f"t{i}" for i in excerpts[j]] for j in expected]
            for e, j in zip(top + rand, expected + rec.tensors["random_index"].tolist(), strict=True):
                torch.testing.assert_close(
                    torch.tensor(e.activations), per_excerpt[j][:, neuron], atol=2e-3, rtol=2e-3
                )
    assert set(rec.families) == {"mlp.0", "mlp.1", "attn.0", "attn.1"}
    assert rec.units("attn.1") == 2 and rec.units("mlp.0") == 24


def test_the_recording_is_the_same_whatever_the_batch_size_when_peaks_tie():
    """Excerpts that share their peak (here: the same tokens, as excerpts share a chat template's opening) tie;
    the lowest excerpt index goes first, so the top excerpts (and the explain/score split) do not depend on the
    batch size. topk broke ties arbitrarily."""
    torch.manual_seed(0)
    model = tiny("llama")
    excerpts = [[5, 6, 7]] * 6 + [[9, 3, 8, 2]] * 5
    tops = [
        record(model, DigitTokenizer(), excerpts, top_k=4, n_random=2, batch_size=size).tensors[
            "mlp.0.top_index"
        ]
        for size in (1, 3, 4, 16)
    ]
    assert all(torch.equal(tops[0], other) for other in tops[1:])
    for row in tops[0].tolist():  # from each group of equal excerpts, its lowest indices, in order
        first, second = [i for i in row if i < 6], [i for i in row if i >= 6]
        assert first == list(range(len(first))) and second == list(range(6, 6 + len(second)))


def test_a_units_max_is_its_largest_activation_at_full_precision():
    """Top excerpts are ranked at the stored (bfloat16) precision: the first kept may not hold the largest value
    itself, but `.max` (by which units are ordered) must."""
    torch.manual_seed(0)
    model = tiny("llama")
    rng = random.Random(1)
    excerpts = [[rng.randrange(1, 60) for _ in range(6)] for _ in range(30)]
    rec = record(model, DigitTokenizer(), excerpts, top_k=3, n_random=2, batch_size=7)
    parts = locate(model)
    with capture_inputs(unit_inputs(parts)) as captured, torch.no_grad():
        model(torch.tensor(excerpts))
    torch.testing.assert_close(
        rec.tensors["mlp.0.max"], captured["mlp.0"].amax(dim=(0, 1)), rtol=1e-5, atol=1e-6
    )


def test_recording_keeps_activations_beyond_the_float16_range():
    torch.manual_seed(0)
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3] *= 1e4
        model.model.layers[0].mlp.gate_proj.weight[3] *= 1e4
    rec = record(model, DigitTokenizer(), [[5, 6, 7], [9, 3, 8]], top_k=2, n_random=1)
    top, _ = rec.excerpts("L0.N3")
    assert all(torch.isfinite(torch.tensor(e.activations)).all() for e in top)
    assert max(max(abs(a) for a in e.activations) for e in top) > 65504


def test_recording_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    rec = record(
        tiny("llama"), DigitTokenizer(), [[1, 2, 3, 4], [5, 6, 7, 8, 9]], top_k=2, n_random=1, heads=True
    )
    rec.meta["model"] = "m"
    rec.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activations.safetensors", "record.json"]
    back = Recording.load(tmp_path)
    assert back.tokens == rec.tokens and back.meta["model"] == "m"
    assert back.excerpts("L1.N3") == rec.excerpts("L1.N3")
    assert back.excerpts("L1.H1")[0]  # heads recorded as units too


def test_documents_from_text_demonstrations_and_prompts(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "plain text here"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "What is 2 + 2?", "category": "allowed"},
        ],
    )
    documents = read_documents([str(path)])
    assert documents[0].text == "plain text here"
    from rlhf.inspect.neurons import render

    texts = [render(tiny_tokenizer, d) for d in documents]
    assert "hello" in texts[1] and texts[2].rstrip().endswith("<|assistant|>")
    windows = make_excerpts(tiny_tokenizer, ["1 + 2 = 3. " * 20], excerpt_tokens=8)
    assert all(len(w) <= 8 for w in windows) and len(windows) > 3


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # what the test printed before is not the command's
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_only_empty_texts_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  "}\n')
    code, err = run_cli(["inspect", "neurons", "--model", tiny_model_dir, "--data", str(blank)], capsys)
    assert code == 2 and err.count("\n") == 0 and "blank.jsonl: every text is empty" in err


def test_empty_data_file_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_cli(["inspect", "neurons", "--model", tiny_model_dir, "--data", str(empty)], capsys)
    assert code == 2 and err.count("\n") == 0 and "empty.jsonl" in err and "empty" in err


def test_a_reward_checkpoint_is_not_a_causal_lm(tmp_path, tiny_model_dir, capsys):
    from rlhf.models import load_scalar_model, load_tokenizer

    reward_dir = tmp_path / "reward"
    load_scalar_model(tiny_model_dir, load_tokenizer(tiny_model_dir)).save_pretrained(reward_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1 + 1 = 2"}])
    code, err = run_cli(["inspect", "neurons", "--model", str(reward_dir), "--data", str(data)], capsys)
    assert code == 2 and err.count("\n") == 0 and "not a causal language model" in err


def test_bad_rows_are_reported_before_the_model_loads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"title": 3}])
    # The model path does not exist: the data error must come first, naming the file and line.
    code, err = run_cli(
        ["inspect", "neurons", "--model", str(tmp_path / "nope"), "--data", str(data)], capsys
    )
    assert code == 2 and "d.jsonl:2" in err


def test_neurons_command_writes_recording_and_page(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{a} + {a} = {2 * a}."} for a in range(30)])
    out = tmp_path / "rec"
    code, _ = run_cli(
        [
            "inspect",
            "neurons",
            "--model",
            tiny_model_dir,
            "--data",
            str(data),
            "--out",
            str(out),
            "--top-k",
            "4",
        ],
        capsys,
    )
    assert code == 0
    meta = json.loads((out / "record.json").read_text())
    assert meta["excerpts"] == 30 and meta["top_k"] == 4
    assert "<span" in (out / "neurons.html").read_text()
