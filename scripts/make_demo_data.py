"""Write the demo data set (data/demo/*.jsonl) from the task families in rlhf/demo.py.

    python scripts/make_demo_data.py [--out data/demo]

Deterministic: every random choice comes from a string-seeded ``random.Random`` per file and nothing
iterates over a set, so reruns give byte-identical files whatever PYTHONHASHSEED is.

How the prompts are split. Every family is enumerated into *units* (a fact-table entry in one phrasing, an
arithmetic number pair, a disallowed action in one phrasing, ...). Within each group (an entity, an
operator, a topic) the units are shuffled and dealt into four disjoint pools, so every entity and topic is
seen in training while held-out prompts are new phrasings or new numbers:

| pool     | share | files                              |
|----------|-------|------------------------------------|
| train    | 50%   | sft.jsonl, rankings.jsonl          |
| dev      | 10%   | sft_eval.jsonl, rankings_eval.jsonl |
| ppo      | 25%   | prompts.jsonl                      |
| ppo_eval | 15%   | prompts_eval.jsonl                 |
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Run as a plain script from a fresh clone (no `pip install -e .`): make `import rlhf` find the repo.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf import demo  # noqa: E402

SEED = 20240611
POOLS = ("train", "dev", "ppo", "ppo_eval")
POOL_SHARES = (0.50, 0.10, 0.25, 0.15)

# Rows per task family in each file.
SFT_COUNTS = {"fact": 360, "arithmetic": 300, "format": 300, "disallowed": 270, "sensitive": 270}
SFT_EVAL_COUNTS = {"fact": 36, "arithmetic": 30, "format": 30, "disallowed": 27, "sensitive": 27}
RANKING_COUNTS = {task: 120 for task in demo.TASKS}
RANKING_EVAL_COUNTS = {task: 20 for task in demo.TASKS}
PROMPT_COUNTS = {task: 80 for task in demo.TASKS}
PROMPT_EVAL_COUNTS = {"fact": 24, "arithmetic": 20, "format": 20, "disallowed": 28, "sensitive": 28}

# Deliberate flaws in the demonstrations (share of that family's rows, exact counts), so the SFT policy
# inherits faults that the reward model learns to rank down and PPO can remove.
SFT_FLAWS = {
    "fact": {"wrong": 0.15},
    "arithmetic": {"wrong": 0.15},
    "format": {"wrong_format": 0.10, "wrong": 0.05},
    "disallowed": {"compliance": 0.25, "preachy": 0.15},
    "sensitive": {"over_refusal": 0.25},
}
MULTI_TURN_RATE = 0.05  # rows with an earlier (user, ideal assistant) exchange
SYSTEM_RATE = 0.05  # rows with a leading system message
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful assistant. Keep answers short.")
PREFIX_RATE = 0.4  # prompts opened with one of demo.PROMPT_PREFIXES
LABEL_NOISE = 0.10  # share of training rankings with one adjacent swap; eval rankings stay clean

ARITHMETIC_NUMBERS = {
    "add": [(a, b) for a in range(1, 21) for b in range(1, 21)],
    "sub": [(a, b) for a in range(2, 21) for b in range(1, a)],
    "mul": [(a, b) for a in range(2, 10) for b in range(2, 10)],
}


@dataclass(frozen=True)
class Unit:
    """A prompt up to its phrasing: the templates it may be rendered with and its slot values."""

    task: str
    group: str  # the stratum for splitting and for balanced sampling (entity, operator, topic, rule)
    templates: tuple[str, ...]
    slots: tuple[tuple[str, str | int], ...]


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")  # str seeds hash with SHA-512, not hash(): stable across runs


def split(units: list[Unit], rng: random.Random) -> dict[str, list[Unit]]:
    """Deal each group's shuffled units into the pools by POOL_SHARES (cumulative rounding)."""
    groups: dict[str, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.group, []).append(unit)
    pools: dict[str, list[Unit]] = {pool: [] for pool in POOLS}
    for group in sorted(groups):
        members = groups[group][:]
        rng.shuffle(members)
        start, cumulative = 0, 0.0
        for pool, share in zip(POOLS, POOL_SHARES, strict=True):
            cumulative += share
            end = int(cumulative * len(members) + 0.5)
            pools[pool] += members[start:end]
            start = end
    return pools


def fact_units() -> list[Unit]:
    units = []
    for fact in demo.FACTS:
        slot = "country" if fact.relation == "capital" else "person"
        for template in demo.TEMPLATES["fact"][fact.relation]:
            units.append(Unit("fact", fact.subject, (template,), ((slot, fact.subject),)))
    return units


def format_units(rng: random.Random) -> list[Unit]:
    """All format units except only_number (those share the arithmetic number split)."""
    templates, units = demo.TEMPLATES["format"], []
    for fact in demo.FACTS:
        relation, slot = (fact.relation, "country" if fact.relation == "capital" else "person")
        for template in templates[f"one_word_{relation}"]:
            units.append(Unit("format", "one_word", (template,), ((slot, fact.subject),)))
        rivals = list(demo.CAPITALS.values()) if relation == "capital" else list(demo.PROFESSIONS)
        # Ask about the true answer and two false ones, so "yes" and "no" are both learned.
        claims = [fact.answer] + rng.sample([r for r in rivals if r != fact.answer], 2)
        claim_slot = "city" if relation == "capital" else "job"
        for claim in claims:
            for template in templates[f"yes_no_{relation}"]:
                units.append(
                    Unit("format", "yes_no", (template,), ((slot, fact.subject), (claim_slot, claim)))
                )
    for things in demo.LIST_ITEMS:
        units += [Unit("format", "list_three", (t,), (("things", things),)) for t in templates["list_three"]]
    for word in demo.REPEAT_WORDS:
        units += [Unit("format", "repeat", (t,), (("word", word),)) for t in templates["repeat"]]
    return units


def arithmetic_pools(rng: random.Random) -> dict[str, list[Unit]]:
    """Split the number pairs once; plain arithmetic and "only the number" prompts share the split, so a
    held-out pair is never seen in training in either phrasing."""
    triples = [
        Unit("arithmetic", op, (), (("a", a), ("b", b)))
        for op, pairs in ARITHMETIC_NUMBERS.items()
        for a, b in pairs
    ]
    pools = split(triples, rng)
    for pool, units in pools.items():
        arithmetic = [
            Unit("arithmetic", u.group, demo.TEMPLATES["arithmetic"][u.group], u.slots) for u in units
        ]
        only = [
            Unit("format", "only_number", demo.TEMPLATES["format"][f"only_number_{u.group}"], u.slots)
            for u in units
        ]
        pools[pool] = arithmetic + only
    return pools


def build_pools() -> dict[str, dict[str, list[Unit]]]:
    """``pools[pool][task]``: the disjoint prompt pools."""
    rng = _rng("units")
    units = fact_units() + format_units(rng)
    for action in demo.DISALLOWED_ACTIONS:
        units += [
            Unit("disallowed", action, (t,), (("action", action),))
            for t in demo.TEMPLATES["disallowed"]["disallowed"]
        ]
    for topic in demo.SENSITIVE_TOPICS:
        units += [
            Unit("sensitive", topic.subject, (t,), (("subject", topic.subject),))
            for t in demo.TEMPLATES["sensitive"][topic.kind]
        ]
    pools = split(units, rng)
    for pool, extra in arithmetic_pools(rng).items():
        pools[pool] += extra
    return {pool: {task: [u for u in pools[pool] if u.task == task] for task in demo.TASKS} for pool in POOLS}


def draw(units: list[Unit], n: int, rng: random.Random) -> list[Unit]:
    """n units balanced over groups: round-robin over the groups, each cycling through its shuffled units."""
    groups: dict[str, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.group, []).append(unit)
    queues: dict[str, list[Unit]] = {g: [] for g in groups}
    order: list[str] = []
    out = []
    while len(out) < n:
        if not order:
            order = sorted(groups)
            rng.shuffle(order)
        group = order.pop()
        if not queues[group]:
            queues[group] = groups[group][:]
            rng.shuffle(queues[group])
        out.append(queues[group].pop())
    return out


def render(unit: Unit, rng: random.Random) -> tuple[str, dict]:
    """The prompt text and the judge's reading of it (a template the judge cannot read back is a bug)."""
    prefix = rng.choice(demo.PROMPT_PREFIXES) if rng.random() < PREFIX_RATE else ""
    prompt = prefix + rng.choice(unit.templates).format(**dict(unit.slots))
    info = demo.classify_prompt(prompt)
    if info is None or info["task"] != unit.task:
        raise RuntimeError(f"the judge reads {prompt!r} as {info}, expected task {unit.task!r}")
    return prompt, info


def unique_items(units: list[Unit], n: int, rng: random.Random) -> list[tuple[str, dict]]:
    """n items with distinct prompt texts, balanced over groups."""
    items, seen = [], set()
    for unit in draw(units, 20 * n, rng):
        prompt, info = render(unit, rng)
        if prompt not in seen:
            seen.add(prompt)
            items.append((prompt, info))
            if len(items) == n:
                return items
    raise RuntimeError(f"only {len(items)} distinct prompts for {n} rows")


def make_sft(pool: dict[str, list[Unit]], counts: dict[str, int], rng: random.Random) -> list[dict]:
    everything = [u for units in pool.values() for u in units]
    rows = []
    for task, n in counts.items():
        flaws = [kind for kind, share in SFT_FLAWS[task].items() for _ in range(round(share * n))]
        flaws += ["ideal"] * (n - len(flaws))
        rng.shuffle(flaws)
        for unit, flaw in zip(draw(pool[task], n, rng), flaws, strict=True):
            prompt, info = render(unit, rng)
            messages = [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": demo.candidate_responses(info, rng)[flaw]})
            if rng.random() < MULTI_TURN_RATE:
                first, first_info = render(rng.choice(everything), rng)
                ideal = demo.candidate_responses(first_info, rng)["ideal"]
                messages = [
                    {"role": "user", "content": first},
                    {"role": "assistant", "content": ideal},
                ] + messages
            if rng.random() < SYSTEM_RATE:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows


def ranking_row(prompt: str, info: dict, rng: random.Random, noisy: bool) -> dict:
    """K = 3 or 4 candidates ranked by the gold judge (ties by CANDIDATE_ORDER), stored shuffled."""
    candidates = demo.candidate_responses(info, rng)
    order = demo.CANDIDATE_ORDER[info["task"]]
    k = rng.choice((3, 4))
    kinds = ["ideal"] + sorted(rng.sample(order[1:], k - 1), key=order.index)
    texts = [candidates[kind] for kind in kinds]
    scores = demo.gold_judge([prompt] * k, texts)
    ranked = sorted(range(k), key=lambda i: (-scores[i], order.index(kinds[i])))
    ranked_texts = [texts[i] for i in ranked]
    slots = list(range(k))
    rng.shuffle(slots)  # slots[r] is where the r-th best response is stored
    responses = [""] * k
    for rank, slot in enumerate(slots):
        responses[slot] = ranked_texts[rank]
    ranking = slots[:]
    if noisy:  # one adjacent swap: a rater who misjudged two neighbours
        i = rng.randrange(k - 1)
        ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
    return {
        "prompt": prompt,
        "responses": responses,
        "ranking": ranking,
        "category": info["category"],
        "task": info["task"],
    }


def make_rankings(
    pool: dict[str, list[Unit]], counts: dict[str, int], noise: float, rng: random.Random
) -> list[dict]:
    items = [item for task, n in counts.items() for item in unique_items(pool[task], n, rng)]
    rng.shuffle(items)
    noisy = set(rng.sample(range(len(items)), round(noise * len(items))))
    return [ranking_row(prompt, info, rng, i in noisy) for i, (prompt, info) in enumerate(items)]


def make_prompts(pool: dict[str, list[Unit]], counts: dict[str, int], rng: random.Random) -> list[dict]:
    items = [item for task, n in counts.items() for item in unique_items(pool[task], n, rng)]
    rng.shuffle(items)
    return [{"prompt": p, "category": info["category"], "task": info["task"]} for p, info in items]


def build() -> dict[str, list[dict]]:
    """Every demo file's rows, by file name."""
    pools = build_pools()
    return {
        "sft.jsonl": make_sft(pools["train"], SFT_COUNTS, _rng("sft")),
        "sft_eval.jsonl": make_sft(pools["dev"], SFT_EVAL_COUNTS, _rng("sft_eval")),
        "rankings.jsonl": make_rankings(pools["train"], RANKING_COUNTS, LABEL_NOISE, _rng("rankings")),
        "rankings_eval.jsonl": make_rankings(pools["dev"], RANKING_EVAL_COUNTS, 0.0, _rng("rankings_eval")),
        "prompts.jsonl": make_prompts(pools["ppo"], PROMPT_COUNTS, _rng("prompts")),
        "prompts_eval.jsonl": make_prompts(pools["ppo_eval"], PROMPT_EVAL_COUNTS, _rng("prompts_eval")),
    }


def sft_summary(rows: list[dict]) -> str:
    """Per task: rows and the share whose final answer the gold judge scores below 1 (the flaws)."""
    totals, flawed = Counter(), Counter()
    for row in rows:
        prompt, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        task = demo.classify_prompt(prompt)["task"]
        totals[task] += 1
        flawed[task] += demo.gold_judge([prompt], [answer])[0] < 1.0
    return ", ".join(f"{t} {flawed[t] / totals[t]:.0%} of {totals[t]}" for t in demo.TASKS)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "demo", help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = build()
    for name, rows in files.items():
        write_jsonl(args.out / name, rows)
        print(f"{args.out / name}: {len(rows)} rows")
    print(f"sft answers below 1.0 under the gold judge: {sft_summary(files['sft.jsonl'])}")


if __name__ == "__main__":
    main()
