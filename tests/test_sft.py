"""The SFT stage on a tiny model: loss falls, the checkpoint reloads, resume continues exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import arithmetic_dialogues, forbid_calls, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import parse_config
from rlhf.sft import SFTStageConfig, main


def sft_config(tmp_path, model_dir, **overrides) -> SFTStageConfig:
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_dialogues(96, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", arithmetic_dialogues(24, seed=2))
    args = {
        "model_name_or_path": model_dir,
        "train_data": str(train),
        "eval_data": str(evaluation),
        "output_dir": str(tmp_path / "sft"),
        "max_steps": "12",
        "per_device_train_batch_size": "16",
        "learning_rate": "3e-3",
        "save_steps": "6",
        "save_strategy": "steps",
        "logging_steps": "4",
        "report_to": "none",
        "use_cpu": "true",
        "seed": "0",
        "lr_scheduler_type": "linear",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    argv = [item for key, value in args.items() for item in (f"--{key}", value)]
    return parse_config(SFTStageConfig, argv)


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_sft_lowers_eval_loss_and_writes_a_reloadable_checkpoint(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = sft_config(tmp_path, tiny_model_dir)
    metrics = main(config)
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5
    manifest = read_manifest(config.output_dir, "sft")
    assert manifest["metrics"]["eval_loss"] == metrics["eval_loss"]
    assert manifest["tokenizer"]["pad_token_id"] != manifest["tokenizer"]["eos_token_id"]
    assert any(name.endswith("train.jsonl") for name in manifest["data"])
    report = manifest["metrics"]["data_report"]
    assert report["train"]["rows"] == 96 and report["eval"]["rows"] == 24
    assert report["train"]["kept"] == 96 and report["train"]["dropped"] == {}
    model = AutoModelForCausalLM.from_pretrained(config.output_dir)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True))
    assert changed
    assert (tmp_path / "sft" / "config.yaml").exists()
    assert (tmp_path / "sft" / "checkpoint-6" / "COMMITTED").exists()


def test_sft_resume_from_an_interrupted_run_matches_the_uninterrupted_one(tmp_path, tiny_model_dir):
    full = sft_config(tmp_path / "a", tiny_model_dir) if (tmp_path / "a").mkdir() is None else None
    main(full)
    # The interrupted run: its state as it was at step 6 (later checkpoint and final output gone).
    interrupted = tmp_path / "b"
    (interrupted).mkdir()
    shutil.copytree(full.output_dir, interrupted / "sft")
    shutil.rmtree(interrupted / "sft" / "checkpoint-12")
    for name in ("manifest.json", "model.safetensors"):
        (interrupted / "sft" / name).unlink()
    resumed = sft_config(interrupted, tiny_model_dir, resume_from_checkpoint="auto")
    main(resumed)
    a, b = weights(full.output_dir), weights(resumed.output_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_sft_resumed_from_an_earlier_checkpoint_writes_its_later_ones_afresh(tmp_path, tiny_model_dir):
    """The finished run's checkpoint-12 is another line of training: moved aside, kept whole; the resumed run's
    checkpoint-12 is a new directory, not the old one rewritten under its commit marker."""
    first = sft_config(tmp_path, tiny_model_dir)
    main(first)
    old = tmp_path / "sft" / "checkpoint-12"
    (old / "left-by-the-first-run").write_text("")
    old_weights = weights(old)
    main(sft_config(tmp_path, tiny_model_dir, resume_from_checkpoint=tmp_path / "sft" / "checkpoint-6"))
    (abandoned,) = [p for p in (tmp_path / "sft").iterdir() if p.name.startswith("checkpoint-12.abandoned-")]
    assert (abandoned / "left-by-the-first-run").exists() and (abandoned / "COMMITTED").exists()
    assert all(torch.equal(old_weights[k], v) for k, v in weights(abandoned).items())
    assert not (old / "left-by-the-first-run").exists() and (old / "COMMITTED").exists()


def test_sft_refuses_bad_data_before_loading_a_model(tmp_path, monkeypatch):
    import rlhf.sft as sft

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    config = sft_config(tmp_path, "does-not-exist", train_data=str(bad))
    forbid_calls(monkeypatch, sft, "load_causal_lm")
    from rlhf.data import DataError

    with pytest.raises(DataError, match=f"{bad}:1: messages: conversation has no assistant turn"):
        main(config)


def test_sft_with_packing_trains_on_the_assistant_labels(tmp_path, tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir, packing="true", max_steps=6, save_strategy="no")
    metrics = main(config)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert read_manifest(config.output_dir, "sft")["config"]["packing"] is True


def test_full_sequence_loss_tokenises_each_conversation_to_ids_and_labels(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    from rlhf.data import Report, load_demonstrations
    from rlhf.sft import tokenize

    config = sft_config(
        tmp_path, tiny_model_dir, assistant_only_loss="false", max_length=12, overflow="truncate"
    )
    rows, _ = load_demonstrations(config.train_data)
    report = Report()
    encoded = tokenize(config, tiny_tokenizer, rows[:4], report)
    full = tiny_tokenizer.apply_chat_template(rows[0]["messages"], tokenize=True)["input_ids"]
    assert len(full) > 12 and report.truncated == 4
    assert encoded[0]["input_ids"] == full[:12] and encoded[0]["labels"] == full[:12]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"eval_fraction": "0"}, "eval set: no examples left"),  # and no eval_data (removed below)
        (
            {"max_length": "8", "overflow": "drop"},
            "train set: no examples left .* dropped: 96 over max_length",
        ),
    ],
)
def test_an_empty_train_or_eval_set_is_a_config_error_before_a_model_loads(
    tmp_path, tiny_model_dir, monkeypatch, overrides, message
):
    import rlhf.sft as sft
    from rlhf.config import ConfigError

    config = sft_config(tmp_path, tiny_model_dir, **overrides)
    if "eval_fraction" in overrides:
        config.eval_data = []
    forbid_calls(monkeypatch, sft, "load_causal_lm")
    with pytest.raises(ConfigError, match=message):
        main(config)


def test_sft_refuses_to_start_from_an_unfinished_stage_output(tmp_path, tiny_model_dir, monkeypatch):
    """A stage output (it has config.yaml) without its manifest did not finish: the reward stage refused one, SFT
    trained from it."""
    import rlhf.sft as sft
    from rlhf.checkpoint import HandoffError

    unfinished = tmp_path / "half"
    shutil.copytree(tiny_model_dir, unfinished)
    (unfinished / "config.yaml").write_text("model_name_or_path: base\n")
    forbid_calls(monkeypatch, sft, "load_causal_lm")
    with pytest.raises(HandoffError, match="no manifest.json; the stage did not finish"):
        main(sft_config(tmp_path, str(unfinished)))
