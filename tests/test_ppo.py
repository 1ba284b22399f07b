"""The PPO stage on a tiny model: first step is on-policy, reward rises, exact resume, faults stop cleanly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import forbid_calls, launch_two_processes, write_jsonl

from rlhf.config import parse_config
from rlhf.ppo import (
    PPOStageConfig,
    TrainingAborted,
    build_run,
    load_checkpoint,
    main,
    run_update,
    save_checkpoint,
)
from rlhf.rewards import RewardSourceError

PROMPTS = [f"What is {a} + {b}?" for a in range(1, 9) for b in range(1, 5)]


def ppo_config(tmp_path: Path, model_dir: str, **overrides) -> PPOStageConfig:
    return parse_config(PPOStageConfig, ppo_argv(tmp_path, model_dir, **overrides))


def ppo_argv(tmp_path: Path, model_dir: str, **overrides) -> list[str]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "category": "allowed"} for p in PROMPTS])
    args = {
        "policy_model": model_dir,
        "train_data": str(prompts),
        "output_dir": str(tmp_path / "ppo"),
        "reward_sources": "ppo_rewards:brevity",
        "reward_weights": "1.0",
        "reward_allowed_modules": "ppo_rewards",
        "value_init": "policy",
        "max_new_tokens": "12",
        "rollout_batch_size": "8",
        "mini_batch_size": "4",
        "micro_batch_size": "2",
        "ppo_epochs": "2",
        "total_updates": "4",
        "learning_rate": "3e-3",
        "save_every": "2",
        "report_to": "none",
        "use_cpu": "true",
        "seed": "0",
        "temperature": "1.0",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return [item for key, value in args.items() for item in (f"--{key}", *str(value).split())]


@pytest.fixture(scope="module")
def attention_dropout_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with `attention_dropout: 0.5`: Llama applies it inside the attention kernel in train mode,
    from a float each layer copied when it was built (no `nn.Dropout` module to find)."""
    import json

    target = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return str(target)


@pytest.mark.parametrize("variant", ["fp32", "attention dropout 0.5", "bf16 mixed precision"])
def test_first_minibatch_is_on_policy_ratio_one_and_kl_zero(tmp_path, tiny_model_dir, request, variant):
    """Sampling, the reference and the training pass see one model in one precision: the first update's KL is 0
    and its ratio 1, also with attention dropout in the config and under bf16 autocast (which the unwrapped
    policy and the reference do not get from accelerate's prepared forward)."""
    model_dir = (
        request.getfixturevalue("attention_dropout_model_dir") if "dropout" in variant else tiny_model_dir
    )
    overrides = {}
    if "bf16" in variant:
        from accelerate.state import AcceleratorState

        # accelerate keeps one process-wide state: its precision is set by the first Accelerator of the session.
        AcceleratorState._reset_state(reset_partial_state=True)
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
        overrides = {"mixed_precision": "bf16"}
    run = build_run(ppo_config(tmp_path, model_dir, **overrides))
    batch, stats, _, _ = run.rollout({})
    assert stats["objective/kl"] == 0.0 and stats["objective/kl_k3"] == 0.0
    run.model.train()
    first = torch.arange(run.config.micro_batch_size)
    logprobs, _, values = run.model(batch.select(first), run.config.temperature)
    mask = batch.response_mask[first].bool()
    ratio = torch.exp(logprobs - batch.logprobs[first])[mask]
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(values[mask], batch.values[first][mask])


def test_the_loss_is_normalised_by_the_token_count_of_every_rank(tmp_path, tiny_model_dir, monkeypatch):
    """DDP and DeepSpeed average gradients over ranks, so each rank divides its token sums by the mean token count
    over ranks; its own count would over-weight the tokens of a rank with short answers. A second rank holding
    100 more tokens is stood in for through `mean_over_ranks`."""
    import rlhf.ppo.update as update

    run = build_run(ppo_config(tmp_path, tiny_model_dir, entropy_coef=0.01))
    batch, _, _, _ = run.rollout({})
    monkeypatch.setattr(update, "mean_over_ranks", lambda local: (local + local + 100.0) / 2)
    seen: dict[str, list] = {"policy": [], "value": [], "entropy": []}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            seen[name].append(kwargs.get("normaliser", args[-1]))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(update, "ppo_policy_loss", spy("policy", update.ppo_policy_loss))
    monkeypatch.setattr(update, "ppo_value_loss", spy("value", update.ppo_value_loss))
    monkeypatch.setattr(update, "masked_mean", spy("entropy", update.masked_mean))
    minibatch = torch.arange(run.config.mini_batch_size)
    run.optimizer_step(batch, minibatch)
    expected = float(batch.response_mask[minibatch].sum()) + 50.0
    for name, normalisers in seen.items():
        assert len(normalisers) == run.config.gradient_accumulation_steps, name
        assert all(n == expected for n in normalisers), (name, normalisers)


@pytest.mark.parametrize(
    "mode,penalty,expected",
    [("replace", -1.0, -1.0), ("replace", 1.0, -1.0), ("subtract", 1.0, 1.5), ("subtract", -1.0, 1.5)],
)
def test_a_missing_eos_is_penalised_whatever_the_sign_of_the_penalty(
    tmp_path, tiny_model_dir, mode, penalty, expected
):
    """TRL writes the penalty as 1.0, the N+ details as -1: either way a truncated answer loses, never gains."""
    run = build_run(ppo_config(tmp_path, tiny_model_dir, missing_eos_penalty=penalty, missing_eos_mode=mode))
    scores = run.penalise_missing_eos(torch.tensor([2.5, 2.5]), torch.tensor([True, False]))
    assert scores.tolist() == [2.5, expected]


@pytest.mark.parametrize(
    "override,message",
    [
        ({"micro_batch_size": 0}, "micro_batch_size: must be above 0, found 0"),
        ({"save_every": 0}, "save_every: must be above 0"),
        ({"total_updates": 0}, "total_updates: must be above 0"),
        ({"target_kl": -1}, "target_kl: must be 0 or more"),
        ({"reward_clip": -1}, "reward_clip: must be 0 or more"),
        ({"gamma": 2}, "gamma: must be in [0, 1]"),
        ({"ema_decay": 2}, "ema_decay: must be in (0, 1)"),
        ({"kl_coef": -1}, "kl_coef: must be 0 or more"),
        ({"dtype": "foo"}, "dtype: must be one of ('auto', 'float32', 'bfloat16', 'float16')"),
        ({"mixed_precision": "foo"}, "mixed_precision: must be one of ('no', 'bf16', 'fp16')"),
    ],
)
def test_a_value_the_stage_cannot_run_with_is_exit_2_at_parse_time(
    tmp_path, monkeypatch, capsys, override, message
):
    """Each of these was a ZeroDivisionError, KeyError or ValueError traceback after the models had loaded, or a
    silently wrong run (a negative reward clip makes every reward the same)."""
    import rlhf.ppo.stage as stage

    forbid_calls(monkeypatch, stage, "load_models", "load_tokenizer")
    assert stage.cli(ppo_argv(tmp_path, "no-model-needed", **override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_responses_are_cut_after_the_first_eos(tmp_path, tiny_model_dir):
    run = build_run(ppo_config(tmp_path, tiny_model_dir, max_new_tokens=24))
    batch, _, _, _ = run.rollout({})
    tok = run.tokenizer
    for ids, mask, has_eos in zip(batch.response_ids, batch.response_mask, batch.has_eos, strict=True):
        length = int(mask.sum())
        if has_eos:
            assert ids[length - 1] == tok.eos_token_id and (ids[: length - 1] != tok.eos_token_id).all()
        assert (ids[length:] == tok.pad_token_id).all()


def test_reward_rises_while_kl_stays_bounded(tmp_path, tiny_model_dir):
    config = ppo_config(
        tmp_path,
        tiny_model_dir,
        reward_sources="ppo_rewards:digits",
        total_updates=10,
        save_every=100,
        kl_coef=0.01,
        missing_eos_penalty="None",
        learning_rate=1e-2,
        rollout_batch_size=16,
        mini_batch_size=8,
        micro_batch_size=8,
    )
    metrics = main(config)
    assert metrics["reward_last"] > metrics["reward_first"] + 0.5
    assert metrics["kl_max"] < 50
    assert (Path(config.output_dir) / "manifest.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(config.output_dir)


def test_a_cpu_run_on_fewer_threads_than_cores_says_so(tmp_path, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr("rlhf.launch.available_cores", lambda: 4096)
    with caplog.at_level(logging.WARNING, logger="rlhf.launch"):
        main(ppo_config(tmp_path, tiny_model_dir, total_updates=1, save_every=100))
    assert "on a 4096-core machine" in caplog.text


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    full = ppo_config(tmp_path / "a", tiny_model_dir) if (tmp_path / "a").mkdir() is None else None
    main(full)
    # The interrupted run: only its committed checkpoint at update 2 survives.
    (tmp_path / "b").mkdir()
    resumed = ppo_config(tmp_path / "b", tiny_model_dir, resume_from_checkpoint="auto")
    shutil.copytree(
        Path(full.output_dir) / "checkpoints" / "step-2", Path(resumed.output_dir) / "checkpoints" / "step-2"
    )
    main(resumed)
    a, b = weights(Path(full.output_dir)), weights(Path(resumed.output_dir))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (
        weights(Path(full.output_dir) / "value").keys() == weights(Path(resumed.output_dir) / "value").keys()
    )


def test_an_explicit_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, tiny_model_dir):
    """Left in place, the abandoned step-4 would outrank the resumed line: rotation (keep_last 1) would delete the
    new step-3 and `resume: auto` would pick step-4."""
    main(ppo_config(tmp_path, tiny_model_dir))  # step-2, step-4
    checkpoints = tmp_path / "ppo" / "checkpoints"
    branch = ppo_config(
        tmp_path, tiny_model_dir, resume_from_checkpoint=checkpoints / "step-2", total_updates=3, keep_last=1
    )
    main(branch)
    from rlhf.checkpoint import committed_checkpoints, resolve_resume

    assert [p.name for p in committed_checkpoints(checkpoints)] == ["step-3"]
    assert resolve_resume("auto", checkpoints) == str(checkpoints / "step-3")
    (abandoned,) = [p for p in checkpoints.iterdir() if p.name.startswith("step-4.abandoned-")]
    assert (abandoned / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "source,message",
    [
        ("ppo_rewards:returns_nan", "'ppo_rewards:returns_nan' returned a non-finite score"),
        ("ppo_rewards:returns_too_few", "'ppo_rewards:returns_too_few' returned 1 scores for 8"),
        ("ppo_rewards:raises", "'ppo_rewards:raises' raised KeyError"),
    ],
)
def test_a_faulty_reward_source_stops_the_run_naming_it(tmp_path, tiny_model_dir, source, message):
    config = ppo_config(tmp_path, tiny_model_dir, reward_sources=source)
    with pytest.raises(RewardSourceError, match=message):
        main(config)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reward_sources": "os:system"}, "module 'os' is outside the allowed import paths"),
        ({"reward_sources": "ppo_rewards:no_such_function"}, "has no attribute 'no_such_function'"),
        ({"reward_sources": "ppo_rewards"}, "'ppo_rewards': expected 'module:function'"),
        ({"reward_sources": "safety", "safety_config": "missing.yaml"}, "missing.yaml: cannot read"),
    ],
)
def test_a_reward_source_that_does_not_resolve_is_exit_2_before_any_model_loads(
    tmp_path, tiny_model_dir, monkeypatch, capsys, overrides, message
):
    import rlhf.ppo.stage as stage

    forbid_calls(monkeypatch, stage, "load_models")
    assert stage.cli(ppo_argv(tmp_path, tiny_model_dir, **overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "ppo").exists()


def test_nonfinite_losses_skip_steps_then_abort_without_saving(tmp_path, tiny_model_dir, monkeypatch):
    import rlhf.ppo.update as ppo

    real = ppo.ppo_policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(ppo, "ppo_policy_loss", nan_loss)
    config = ppo_config(tmp_path, tiny_model_dir, max_nonfinite_steps=3)
    with pytest.raises(TrainingAborted, match="update 0: 3 non-finite losses in a row"):
        main(config)
    assert not (Path(config.output_dir) / "checkpoints").exists()
    assert not (Path(config.output_dir) / "manifest.json").exists()


def test_prompts_are_validated_before_models_load(tmp_path, monkeypatch):
    import rlhf.ppo.stage as ppo

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    forbid_calls(monkeypatch, ppo, "load_models")
    config = ppo_config(tmp_path, "no-model-here", train_data=str(bad))
    from rlhf.data import DataError

    with pytest.raises(DataError, match=f"{bad}:2: prompt: blank text"):
        main(config)


@pytest.mark.slow
def test_two_processes_on_cpu(tmp_path, tiny_model_dir):
    config = ppo_config(tmp_path, tiny_model_dir, total_updates=2)
    argv = [
        f"--{k}={v}"
        for k, v in {
            "policy_model": tiny_model_dir,
            "train_data": config.train_data[0],
            "output_dir": config.output_dir,
            "reward_sources": "ppo_rewards:brevity",
            "reward_allowed_modules": "ppo_rewards",
            "value_init": "policy",
            "max_new_tokens": 8,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,
            "micro_batch_size": 2,
            "ppo_epochs": 1,
            "total_updates": 2,
            "report_to": "none",
            "use_cpu": "true",
        }.items()
    ]
    result = launch_two_processes("rlhf.ppo", argv, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (Path(config.output_dir) / "manifest.json").exists()


def test_always_full_length_samples_past_eos_then_cuts(tmp_path, tiny_model_dir, monkeypatch):
    run = build_run(ppo_config(tmp_path, tiny_model_dir, max_new_tokens=16, always_full_length="true"))
    seen = {}
    real = run.policy.generate

    def spy(**kwargs):
        seen.update(kwargs)
        out = real(**kwargs)
        # Plant an EOS mid-answer: sampling went on past it, and the rollout must cut there.
        out[0, kwargs["input_ids"].shape[1] + 3] = run.tokenizer.eos_token_id
        return out

    monkeypatch.setattr(run.policy, "generate", spy)
    batch, _, _, _ = run.rollout({})
    # EOS is not forbidden (no min_new_tokens): the sampled distribution stays the policy's.
    assert seen["eos_token_id"] is None and not seen.get("min_new_tokens")
    assert batch.response_ids.shape[1] == 16
    assert int(batch.response_mask[0].sum()) == 4 and bool(batch.has_eos[0])


def test_the_demo_gold_judge_works_as_a_reward_source(tmp_path, tiny_model_dir):
    from rlhf.rewards import call_source, load_function

    judge = load_function("rlhf.demo:gold_judge")
    # Called as PPO calls a source: with the context keywords, which the judge accepts.
    scores = call_source(
        "gold", judge, ["What is 2 + 3?"] * 2, ["5.", "7."], prompt_messages=[[], []], categories=[None, None]
    )
    assert scores[0] == pytest.approx(1.0) and scores[1] < scores[0]


def ptx_config(tmp_path: Path, model_dir: str, **overrides) -> PPOStageConfig:
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": p, "completion": "A sum."} for p in PROMPTS])
    return ppo_config(tmp_path, model_dir, ptx_coef=0.5, ptx_data=str(demos), **overrides)


def test_ptx_draws_fresh_demonstrations_for_every_micro_batch(tmp_path, tiny_model_dir):
    run = build_run(ptx_config(tmp_path, tiny_model_dir, total_updates=1))
    Path(run.config.output_dir).mkdir(parents=True)
    taken: list[int] = []

    class Recording(list):
        def __getitem__(self, index):
            taken.append(index)
            return super().__getitem__(index)

    run.ptx = Recording(run.ptx)
    run_update(run)
    micro = run.config.micro_batch_size
    draws = [tuple(taken[i : i + micro]) for i in range(0, len(taken), micro)]
    # 8 samples in micro-batches of 2, over 2 epochs: 8 ptx draws, not one draw repeated 8 times.
    assert len(draws) == 8
    assert len(set(draws)) > 1


def test_the_ptx_sampler_resumes_where_it_stopped(tmp_path, tiny_model_dir):
    config = ptx_config(tmp_path, tiny_model_dir)
    run = build_run(config)
    run.ptx_rows()
    save_checkpoint(run)
    expected = [row["input_ids"] for row in run.ptx_rows()]
    resumed = build_run(config)
    load_checkpoint(resumed, str(Path(config.output_dir) / "checkpoints" / "step-0"))
    assert [row["input_ids"] for row in resumed.ptx_rows()] == expected


def test_update_statistics_are_token_weighted_over_micro_batches_and_the_early_stop_reads_them(
    tmp_path, tiny_model_dir, monkeypatch
):
    import rlhf.ppo.update as update

    real = update.ppo_policy_loss
    seen: list[tuple[float, float]] = []  # (response tokens, approx_kl) per micro-batch

    def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range, normaliser):
        loss, stats = real(logprobs, old_logprobs, advantages, mask, clip_range, normaliser)
        approx_kl = 10.0 if len(seen) % 2 == 0 else 0.0  # the last micro-batch of every minibatch reads 0
        seen.append((float(mask.sum()), approx_kl))
        return loss, {**stats, "approx_kl": torch.tensor(approx_kl)}

    monkeypatch.setattr(update, "ppo_policy_loss", policy_loss)
    run = build_run(ppo_config(tmp_path, tiny_model_dir, approx_kl_stop=1.0, ppo_epochs=3))
    batch, _, _, _ = run.rollout({})
    stats = run.train_on(batch)
    tokens = sum(t for t, _ in seen)
    assert stats["policy/approx_kl"] == pytest.approx(sum(t * kl for t, kl in seen) / tokens)
    # The first epoch's mean approx KL is above the threshold: the update stops after 1 epoch of 4 micro-batches.
    assert stats["policy/early_stops"] == 1.0 and len(seen) == 4


def test_a_bad_safety_examples_file_is_exit_2_before_any_model_loads(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    import rlhf.ppo.stage as stage

    (tmp_path / "examples.jsonl").write_text("{oops\n")
    (tmp_path / "safety.yaml").write_text("classifier: embedding\nexamples_path: examples.jsonl\n")
    forbid_calls(monkeypatch, stage, "load_models")
    argv = ppo_argv(tmp_path, tiny_model_dir, reward_sources="safety", safety_config=tmp_path / "safety.yaml")
    assert stage.cli(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'examples.jsonl'}:1: malformed JSON" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "classifier,model_files,message",
    [
        ("zero-shot-nli", None, "no-such-model: no such model directory"),
        ("llm-judge", ["config.json", "pytorch_model.bin"], "only pickle weights"),
        ("embedding", ["config.json", "pytorch_model.bin"], "only pickle weights"),
    ],
)
def test_a_safety_classifier_model_that_cannot_load_is_exit_2_before_any_model_loads(
    tmp_path, tiny_model_dir, monkeypatch, capsys, classifier, model_files, message
):
    import rlhf.ppo.stage as stage

    for name in model_files or []:
        (tmp_path / "no-such-model").mkdir(exist_ok=True)
        (tmp_path / "no-such-model" / name).write_text("{}")
    (tmp_path / "safety.yaml").write_text(f"classifier: {classifier}\nmodel_name_or_path: ./no-such-model\n")
    forbid_calls(monkeypatch, stage, "load_models")
    argv = ppo_argv(tmp_path, tiny_model_dir, reward_sources="safety", safety_config=tmp_path / "safety.yaml")
    assert stage.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "ppo").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"temperature": 0}, "temperature: must be above 0"),
        ({"top_p": 0}, "top_p: must be in"),
        ({"top_k": -1}, "top_k: must be 0"),
    ],
)
def test_sampling_settings_that_cannot_sample_are_config_errors(tmp_path, tiny_model_dir, overrides, message):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ppo_config(tmp_path, tiny_model_dir, **overrides)


def test_every_rank_needs_a_full_rollout_batch_of_prompts(tmp_path, tiny_model_dir, tiny_tokenizer):
    from rlhf.config import ConfigError
    from rlhf.data import Report
    from rlhf.ppo.stage import load_prompt_set

    config = ppo_config(tmp_path, tiny_model_dir)  # rollout_batch_size 8
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(12)]
    prompts, _ = load_prompt_set(config, tiny_tokenizer, rows, Report(), world=1)
    assert len(prompts.batch(0, 8, 0, rank=0, world=1)) == 8
    # Two ranks would need 16: rank 1 would get 4 prompts (fewer micro-batches than rank 0) and the job would hang.
    with pytest.raises(ConfigError, match="12 usable prompts, fewer than rollout_batch_size 8 x 2 processes"):
        load_prompt_set(config, tiny_tokenizer, rows, Report(), world=2)
    prompts, _ = load_prompt_set(config, tiny_tokenizer, rows + rows[:4], Report(), world=2)
    ranks = [prompts.batch(0, 8, 0, rank=r, world=2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [8, 8] and not set(ranks[0]) & set(ranks[1])


def test_value_init_reward_is_refused_for_an_encoder_or_another_vocabulary(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    import json

    from rlhf.checkpoint import tokenizer_fingerprint
    from rlhf.config import ConfigError
    from rlhf.ppo.stage import check_value_init

    reward_dir = tmp_path / "rm"
    reward_dir.mkdir()
    (reward_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    config = ppo_config(tmp_path, tiny_model_dir, reward_model=str(reward_dir), value_init="reward")
    same = {"tokenizer": tokenizer_fingerprint(tiny_tokenizer)}
    check_value_init(config, same, tiny_tokenizer)  # a causal reward model on the policy's tokenizer
    other = {"tokenizer": {**same["tokenizer"], "vocab_size": 30522}}
    with pytest.raises(
        ConfigError, match=f"tokenizer's vocab_size is 30522, the policy's {len(tiny_tokenizer)}"
    ):
        check_value_init(config, other, tiny_tokenizer)
    (reward_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="it is a bert encoder, not a causal model.*Set value_init: policy"):
        check_value_init(config, same, tiny_tokenizer)
    check_value_init(ppo_config(tmp_path, tiny_model_dir, reward_model=str(reward_dir)), same, tiny_tokenizer)


def test_each_decision_the_ranks_must_share_is_taken_on_the_mean_over_ranks(
    tmp_path, tiny_model_dir, monkeypatch
):
    """`mean_over_ranks` stands in for the other ranks here: PPO must act on what it returns, not on this rank's own
    value, or ranks would stop, skip or move beta apart (a hang, or weights and beta that differ by rank)."""
    import rlhf.ppo.stage as ppo_stage
    import rlhf.ppo.update as update

    # The approx-KL early stop: far below the threshold on this rank, far above it over all ranks.
    run = build_run(ppo_config(tmp_path, tiny_model_dir, approx_kl_stop=1e3))
    batch, _, _, _ = run.rollout({})
    monkeypatch.setattr(update, "mean_over_ranks", lambda value: value + 1e6)
    assert run.train_on(batch)["policy/early_stops"] == 1.0
    # A rollout that is finite here but not on another rank is skipped here too; beta moves by the KL of all ranks.
    run = build_run(ppo_config(tmp_path, tiny_model_dir, target_kl=6.0, kl_horizon=100))
    Path(run.config.output_dir).mkdir(parents=True, exist_ok=True)
    over_ranks = iter([0.5, 12.0])  # the share of ranks with a finite rollout, then the mean KL (2 x target)
    monkeypatch.setattr(ppo_stage, "mean_over_ranks", lambda value: next(over_ranks))
    beta = run.kl_ctl.value
    stats = run_update(run)
    assert stats["loss/nonfinite_steps"] == 1.0 and run.nonfinite_total == 1
    assert run.kl_ctl.value == pytest.approx(beta * (1 + 0.2 * 8 / 100))  # error clipped to 0.2; 8 episodes
