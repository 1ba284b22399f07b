"""Reward functions for the PPO tests, importable as `ppo_rewards:NAME` (tests/ is on sys.path under pytest)."""

from __future__ import annotations


def brevity(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Shorter answers score higher: learnable by a random tiny model in a few updates."""
    return [-len(c) / 10.0 for c in completions]


def constant(prompts: list[str], completions: list[str], **_) -> list[float]:
    return [0.0 for _ in completions]


def returns_nan(prompts: list[str], completions: list[str], **_) -> list[float]:
    return [float("nan")] * len(completions)


def returns_too_few(prompts: list[str], completions: list[str], **_) -> list[float]:
    return [0.0]


def raises(prompts: list[str], completions: list[str], **_) -> list[float]:
    raise KeyError("judge offline")


def digits(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Share of characters that are digits: a per-token preference a random tiny model learns in a few updates."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) * 5.0 for c in completions]


_calls = {"n": 0}


def dies_on_rank_1(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Rank 1 exits abruptly on its second call, as a crashed worker would."""
    import os

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] >= 2:
        os._exit(3)
    return [0.0 for _ in completions]
