"""Real preference data: 1,800 raw HH-RLHF rows (harmless-base test, `../shared/data` beside the checkout).

Exact counts pin the malformed/degenerate policy on real data: four rows whose preferred final answer is empty
are kept, tokenised like any answer (ending with EOS), and nothing is dropped; the eval split never shares a
conversation with training.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from rlhf import data
from rlhf.data import Report, conversation_key, load_demonstrations, load_preferences, split_last_rows

HH_DEV = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
EMPTY_ANSWER_LINES = [87, 517, 926, 1104]


@pytest.fixture(scope="module")
def hh_pairs():
    return load_preferences(str(HH_DEV))


def stage_config(max_length: int, **overrides):
    from rlhf.reward_model import RewardStageConfig

    return RewardStageConfig(
        model_name_or_path="unused",
        train_data=["unused"],
        output_dir="unused",
        max_length=max_length,
        report_to="none",
        **overrides,
    )


def lines_of(rows: list[dict]) -> list[int]:
    return [int(r["source"].rpartition(":")[2]) for r in rows]


def test_every_row_is_kept_as_a_pair_with_its_empty_answers(hh_pairs):
    pairs, report = hh_pairs
    assert report.counts() == {
        "rows": 1800,
        "kept": 1800,
        "dropped": {},
        "empty_answers_kept": 4,
        "truncated": 0,
    }
    empty = [p for p in pairs if p["chosen"][-1]["content"] == ""]
    assert lines_of(empty) == EMPTY_ANSWER_LINES
    assert all(p["rejected"][-1]["content"].strip() for p in empty)


def test_validate_command_accepts_the_dev_file_as_pairs_and_as_demonstrations():
    for kind in ("pairs", "sft"):
        result = run_cli("data", "validate", "--kind", kind, str(HH_DEV))
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert (summary["rows"], summary["kept"], summary["dropped"]) == (1800, 1800, {})
        assert summary["empty_answers_kept"] == 4 and summary["dropped_rows"] == []


def test_chosen_transcripts_read_as_multi_turn_demonstrations():
    demos, report = load_demonstrations(str(HH_DEV))
    assert (report.rows, report.kept, report.drops, report.empty_answers) == (1800, 1800, {}, 4)
    assert max(len(d["messages"]) for d in demos) > 2 and demos[86]["messages"][3]["content"] == ""


def test_empty_answers_are_tokenised_ending_with_eos(hh_pairs, tiny_tokenizer):
    from rlhf.reward_model import encode_pairs

    pairs, _ = hh_pairs
    empty = [p for p in pairs if p["chosen"][-1]["content"] == ""]
    report = Report()
    rows = encode_pairs(tiny_tokenizer, empty, stage_config(max_length=64), report)
    eos = tiny_tokenizer.eos_token_id
    assert len(rows) == 4 and report.empty_answers == 4
    assert all(r["chosen_ids"][-1] == eos and r["rejected_ids"][-1] == eos for r in rows)
    # SFT on the chosen transcript trains the empty final turn as just its end-of-turn token.
    demos, _ = load_demonstrations(str(HH_DEV))
    encoded, reason = data.tokenize_demonstration(tiny_tokenizer, demos[516]["messages"], None, "truncate")
    assert reason is None
    assert [t for t in encoded["labels"] if t != -100] == [eos]


def test_the_last_rows_split_never_shares_a_conversation(hh_pairs):
    pairs, _ = hh_pairs
    report = Report()
    train, evaluation = split_last_rows(pairs, 300, report)
    assert lines_of(evaluation) == list(range(1501, 1801))
    assert len(train) == 1500 - 24 and report.drops == {"conversation in eval": 24}
    assert not {conversation_key(p) for p in train} & {conversation_key(p) for p in evaluation}
    # The 24 left out are other branches of eval conversations, not arbitrary rows.
    held = {conversation_key(p) for p in evaluation}
    assert all(conversation_key(p) in held for p in pairs if p not in train and p not in evaluation)


def test_sft_and_reward_configs_hold_out_the_same_conversations():
    """One config directory, SFT then RM: the reward model's eval conversations are unseen by the SFT policy too."""
    from rlhf.config import parse_config
    from rlhf.reward_model import RewardStageConfig, load_pairs
    from rlhf.sft import SFTStageConfig, load_data

    def config(cls, name):
        return parse_config(cls, ["--config", str(REPO / "configs/hh" / name), "--use_cpu", "true"])

    sft_train, sft_eval, sft_report, sft_eval_report = load_data(config(SFTStageConfig, "sft.yaml"))
    rm_train, rm_eval, rm_report, rm_eval_report = load_pairs(config(RewardStageConfig, "reward.yaml"))
    assert lines_of(sft_eval) == lines_of(rm_eval) == list(range(1501, 1801))
    assert lines_of(sft_train) == lines_of(rm_train) and len(sft_train) == 1476
    assert sft_report.rows == rm_report.rows == 1500 and sft_eval_report.rows == rm_eval_report.rows == 300
    assert sft_report.drops == rm_report.drops == {"conversation in eval": 24}
    assert not {conversation_key(r) for r in sft_train} & {conversation_key(r) for r in rm_eval}


def test_the_random_split_keeps_each_conversation_on_one_side(hh_pairs):
    from types import SimpleNamespace

    from rlhf.trainer_stage import held_out

    pairs, _ = hh_pairs
    by_key: dict[str, int] = {}
    for pair in pairs:
        by_key[conversation_key(pair)] = by_key.get(conversation_key(pair), 0) + 1
    assert sum(n > 1 for n in by_key.values()) > 20  # the dev file does branch conversations
    for seed in range(3):
        config = SimpleNamespace(eval_last_rows=0, eval_fraction=0.1, seed=seed)
        report = Report(rows=1800)
        train, evaluation, eval_report = held_out(pairs, config, report)
        assert not {conversation_key(p) for p in train} & {conversation_key(p) for p in evaluation}
        assert len(train) + len(evaluation) == 1800 and 150 < len(evaluation) < 210
        assert report.rows + eval_report.rows == 1800 and eval_report.rows == len(evaluation)


def test_validate_counts_the_pairs_the_reward_stage_would_cut(hh_pairs, tmp_path_factory):
    """`--max_length` counts what the stage truncates: the same number the stage's own report gives."""
    from safety_support import minilm_tokenizer_dir

    from rlhf.models import load_tokenizer
    from rlhf.reward_model import encode_pairs

    tokenizer_dir = minilm_tokenizer_dir(tmp_path_factory)
    result = run_cli(
        "data",
        "validate",
        "--kind",
        "pairs",
        "--tokenizer",
        str(tokenizer_dir),
        "--max_length",
        "128",
        str(HH_DEV),
    )
    assert result.returncode == 0, result.stderr
    over = json.loads(result.stdout)["over_max_length"]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    report, last_turn_report = Report(), Report()
    encode_pairs(tokenizer, hh_pairs[0], stage_config(max_length=128), report)
    encode_pairs(tokenizer, hh_pairs[0], stage_config(max_length=128, context_turns=1), last_turn_report)
    assert over["pairs"] == report.truncated == 1114
    # Fewer pairs lose part of the last request than lose anything, but some do; the stage reading only the
    # last user turn cuts exactly those.
    assert 0 < over["last_user_turn_and_answer"] == last_turn_report.truncated == 312 < over["pairs"]
    # Without a tokenizer there is nothing to count with: a usage error, before any data is read.
    result = run_cli("data", "validate", "--kind", "pairs", "--max_length", "128", str(HH_DEV))
    assert result.returncode == 2 and "--max_length needs --kind pairs and --tokenizer" in result.stderr
