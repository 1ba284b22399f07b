"""The cross-validation folds of `scripts/eval_minilm_reward.py`: which rows each fold holds out."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from rlhf.config import ConfigError, parse_config
from rlhf.data import conversation_key
from rlhf.reward_model import RewardStageConfig, load_pairs
from scripts.eval_minilm_reward import move_block_last, write_fold

HH_DEV = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def test_a_block_moves_to_the_end_and_the_rest_keep_their_order():
    rows = [str(i) for i in range(10)]
    assert move_block_last(rows, 1, 3) == ["0", "1", "2", "6", "7", "8", "9", "3", "4", "5"]
    assert move_block_last(rows, 0, 5) == rows[5:] + rows[:5]
    assert move_block_last(rows, 1, 5) == rows
    with pytest.raises(ValueError, match="fold 3 is outside 0..2"):
        move_block_last(rows, 3, 3)


def hh_config(tmp_path, fold_rows: int = 300) -> RewardStageConfig:
    return parse_config(
        RewardStageConfig,
        [
            "--config",
            str(REPO / "configs/hh/reward.yaml"),
            "--output_dir",
            str(tmp_path / "rm"),
            "--train_data",
            str(HH_DEV),
            "--eval_last_rows",
            str(fold_rows),
        ],
    )


def test_the_last_fold_is_the_shipped_split_and_fold_zero_holds_out_the_first_rows(tmp_path):
    config = hh_config(tmp_path)
    original = HH_DEV.read_text(encoding="utf-8")
    assert Path(write_fold(config, 5)).read_text(encoding="utf-8") == original

    config.train_data = [write_fold(config, 0)]
    train, held, report, eval_report = load_pairs(config)
    fold_lines = Path(config.train_data[0]).read_text(encoding="utf-8").splitlines()
    assert fold_lines[-300:] == original.splitlines()[:300]
    assert eval_report.rows == 300
    # Training keeps the other 1,500 rows, less those that open an eval conversation (dropped and counted).
    dropped = sum(report.counts()["dropped"].values())
    assert len(train) == 1500 - dropped and len(train) + len(held) == 1800 - dropped
    assert {conversation_key(p) for p in held}.isdisjoint(conversation_key(p) for p in train)
    assert dropped == report.drops["conversation in eval"] > 0


def test_a_fold_needs_a_single_file_split_by_its_last_rows(tmp_path):
    config = hh_config(tmp_path, fold_rows=0)
    with pytest.raises(ConfigError, match="--fold needs eval_last_rows"):
        write_fold(config, 0)
