"""Cheap reward sources for the benchmarks (allowed via `reward_allowed_modules: [bench_rewards]`)."""

from rlhf.demo import gold_judge


def gold(prompts: list[str], completions: list[str], **_context) -> list[float]:
    """The demo's programmatic judge; `rlhf.demo:gold_judge` itself takes no context keywords, so wrap it."""
    return gold_judge(prompts, completions)
