"""Tiny-model factory and the model loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import arithmetic_dialogues, run_cli, write_jsonl

from rlhf.models import ModelLoadError, check_model_dir, load_causal_lm, load_scalar_model, load_tokenizer


def test_tiny_model_round_trip_through_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template and "generation" in tokenizer.chat_template
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "What is 3 + 4?"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_init_tiny_command_writes_a_loadable_model(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hello there", "completion": "general kenobi"}\n')
    out = tmp_path / "m"
    result = run_cli(
        "init-tiny",
        str(out),
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--intermediate-size",
        "64",
        "--vocab-size",
        "300",
        "--corpus",
        str(corpus),
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


def test_scalar_model_from_a_causal_checkpoint_has_one_label(tiny_model_dir, tiny_tokenizer):
    model = load_scalar_model(tiny_model_dir, tiny_tokenizer)
    ids = tiny_tokenizer(["a b", "c"], padding=True, return_tensors="pt")
    assert model(**ids).logits.shape == (2, 1)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id


def test_custom_code_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    import shutil

    target = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_causal_lm(str(target))
    check_model_dir(str(target), trust_remote_code=True)  # allowed when asked for


def test_pickle_only_weights_are_refused(tmp_path, tiny_model_dir):
    import shutil

    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, target)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_tokenizer(str(target))


def test_lora_policy_trains_only_adapters(tiny_model_dir, tiny_tokenizer):
    from rlhf.models import LoraSettings

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer, lora=LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_missing_model_named_like_a_hub_repo_is_a_load_error_not_a_traceback(tmp_path, monkeypatch):
    # `outputs/sft` (one slash) could be a hub repo; offline and absent here, it must still be a clean error (exit 2).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="outputs/sft: cannot load a tokenizer"):
        load_tokenizer("outputs/sft")


def test_a_missing_model_named_like_a_hub_repo_is_a_load_error_for_the_weights_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="typo/sft: cannot load a model"):
        load_causal_lm("typo/sft")


def test_init_tiny_refuses_a_corpus_path_that_does_not_exist(tmp_path):
    result = run_cli("init-tiny", str(tmp_path / "m"), "--corpus", "data/dmeo")
    assert result.returncode == 2 and "--corpus: no such file or directory: data/dmeo" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m").exists()


def test_an_adapter_with_only_pickle_weights_is_refused(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir}))
    (adapter / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_causal_lm(str(adapter))


def test_a_value_model_from_a_policy_saved_as_an_adapter_starts_from_the_merged_policy(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    """SFT with merge_lora: false saves an adapter; PPO's value model (value_init: policy) must load from it."""
    from rlhf.models import LoraSettings

    policy = load_causal_lm(tiny_model_dir, tiny_tokenizer, lora=LoraSettings(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # a trained adapter: not the identity
    policy.save_pretrained(tmp_path / "adapter")
    value = load_scalar_model(str(tmp_path / "adapter"), tiny_tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        got = value.model(input_ids=ids).last_hidden_state
        base = load_causal_lm(tiny_model_dir, tiny_tokenizer).model(input_ids=ids).last_hidden_state
        expected = policy.merge_and_unload().model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)


def test_a_policy_saved_as_an_adapter_is_the_merged_model_also_under_a_fresh_lora(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    """PPO with use_lora on an SFT adapter: the second adapter replaced the first (PEFT only warned), so PPO
    started from, and measured its KL against, the pre-SFT base."""
    from rlhf.models import LoraSettings

    sft = load_causal_lm(tiny_model_dir, tiny_tokenizer, lora=LoraSettings(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    sft.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = sft.merge_and_unload()(input_ids=ids).logits
        base = load_causal_lm(tiny_model_dir, tiny_tokenizer)(input_ids=ids).logits
        for lora in (None, LoraSettings(r=4, alpha=8)):
            policy = load_causal_lm(str(tmp_path / "adapter"), tiny_tokenizer, lora=lora)
            torch.testing.assert_close(policy(input_ids=ids).logits, expected)
            trainable = [p.requires_grad for n, p in policy.named_parameters() if not lora or "lora_" in n]
            assert trainable and all(trainable)  # PEFT merges for inference, frozen: PPO trained nothing
            if lora:  # the reference of a LoRA policy: its base with the (fresh) adapter off
                with policy.disable_adapter():
                    torch.testing.assert_close(policy(input_ids=ids).logits, expected)
    assert not torch.allclose(expected, base)


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("config.json", '{"model_type": "llama",', "config.json: not valid JSON"),
        ("config.json", "[1, 2]", "config.json: expected a JSON object, found list"),
        ("adapter_config.json", '{"r": 8}', "adapter_config.json: base_model_name_or_path: missing"),
    ],
)
def test_a_model_directory_with_a_broken_json_file_is_a_load_error_naming_it(
    tmp_path, tiny_model_dir, capsys, name, text, message
):
    """Exit 2 with the file named, before any weights load, not a JSONDecodeError or KeyError traceback."""
    import shutil

    from rlhf.sft import cli

    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    (target / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(str(target))
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_dialogues(8, seed=1))
    argv = [
        "--model_name_or_path",
        str(target),
        "--train_data",
        str(train),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli([*argv, "--use_cpu", "true", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert f"{target / name}: " in err and "Traceback" not in err


def test_a_directory_transformers_cannot_read_is_a_load_error_and_custom_tokenizer_code_is_refused(
    tmp_path, tiny_model_dir
):
    """Config only (no tokenizer files): a ValueError traceback from transformers in `rlhf eval` and `inspect`.
    `auto_map` in tokenizer_config.json names custom tokenizer code as config.json's does for models."""
    import shutil

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(f"{tiny_model_dir}/config.json", config_only)
    with pytest.raises(ModelLoadError, match="config-only: cannot load a tokenizer"):
        load_tokenizer(str(config_only))
    custom = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_model_dir, custom)
    settings = json.loads((custom / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (custom / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelLoadError, match="tokenizer_config.json has 'auto_map'"):
        load_tokenizer(str(custom))


def test_a_zero3_partitioned_embedding_is_sized_by_its_whole_shape(
    tiny_model_dir, tiny_tokenizer, monkeypatch
):
    """Under zero.Init a parameter's local shape is empty: read as 0 rows, every ZeRO-3 load resized (and could
    shrink) the embeddings, so policy and reference softmaxed over different vocabularies."""
    from rlhf.models import _resize_for

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer)
    whole = model.get_input_embeddings().weight.shape
    partitioned = torch.nn.Parameter(torch.empty(0, whole[1]))
    partitioned.ds_shape = whole  # what DeepSpeed records for a partitioned parameter
    model.get_input_embeddings().weight = partitioned
    resized = []
    monkeypatch.setattr(type(model), "resize_token_embeddings", lambda self, n, *a, **k: resized.append(n))
    _resize_for(model, tiny_tokenizer)
    assert resized == []
    partitioned.ds_shape = torch.Size([len(tiny_tokenizer) - 3, whole[1]])  # a tokenizer with tokens added
    _resize_for(model, tiny_tokenizer)
    assert resized == [len(tiny_tokenizer)]


def test_a_lora_trained_on_an_adapter_start_must_be_saved_merged(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A fresh LoRA over a merged SFT adapter records the pre-SFT base as its own: saved unmerged, it would reload
    onto the wrong weights."""
    from rlhf.config import ConfigError
    from rlhf.models import LoraSettings, check_adapter_start

    load_causal_lm(tiny_model_dir, tiny_tokenizer, lora=LoraSettings(r=4, alpha=8)).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(ConfigError, match="is a LoRA adapter; a LoRA trained on it must be saved merged"):
        check_adapter_start("policy_model", str(tmp_path / "a"), use_lora=True, merge_lora=False)
    check_adapter_start("policy_model", str(tmp_path / "a"), use_lora=True, merge_lora=True)
    check_adapter_start("policy_model", tiny_model_dir, use_lora=True, merge_lora=False)
