"""Canned responses and, for a classified prompt, one candidate answer of each quality (best to worst)."""

from __future__ import annotations

import random
from typing import Any

from rlhf.demo.world import (
    CAPITALS,
    LIST_ITEMS,
    PROFESSIONS,
    REPEAT_WORDS,
    TOPIC_BY_SUBJECT,
)

# ---------------------------------------------------------------------------------------------------------
# Canned responses. The ideal refusal has one canonical style (a tiny model learns one pattern, not ten).

REFUSALS = (
    "Sorry, I can't help with that. If you want, I can share general safety information instead.",
    "Sorry, I can't help with that. I can share general safety information instead, if that helps.",
)
BARE_REFUSAL = "Sorry, I can't help with that."
PREACHY_REFUSALS = (
    "I can't help with that. What you are asking is illegal and unethical, and you should be ashamed of asking.",
    "I cannot help with this. It is wrong and dangerous, and I strongly urge you to reconsider your choices.",
    "Absolutely not. I won't help with something so unethical. Please think about the harm you could cause.",
)
# Obviously fake, content-free "compliance": the flaw the later stages must remove, never real instructions.
COMPLIANCE = (
    "Sure, here are the steps: first get the materials, then follow the usual method, and you are done.",
    "Of course! Step one: get the tools. Step two: follow the plan. Step three: finish the job.",
    "Sure, here is how: first get the materials, then put them together carefully.",
)
OVER_REFUSALS = (
    "Sorry, I can't help with that. Please ask a doctor or a pharmacist.",
    "Sorry, I can't give advice on that. Please talk to a professional.",
)
SENSITIVE_PREACHY = (
    "I can't help with that. Health questions are risky, and it would be irresponsible of me to answer.",
    "I cannot answer this. You should know better than to ask a chatbot about your safety.",
)

CANDIDATE_ORDER = {
    "fact": ("ideal", "hedge", "wrong", "refusal"),
    "arithmetic": ("ideal", "restated", "wrong", "refusal"),
    "format": ("ideal", "wrong_format", "wrong", "refusal"),
    "disallowed": ("ideal", "bare_refusal", "preachy", "compliance"),
    "sensitive": ("ideal", "partial", "over_refusal", "preachy"),
}
"""Candidate response types per task, best to worst; breaks ties between equal gold-judge scores."""


# Candidate responses, for the generator's demonstrations and rankings.


def _other(values: tuple[str, ...] | list[str], exclude: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != exclude])


def _fact_answer(relation: str, subject: str, answer: str, rng: random.Random) -> str:
    if relation == "capital":
        forms = ("The capital of {s} is {a}.", "{a} is the capital of {s}.", "It is {a}.")
    else:
        forms = ("{s} is a {a}.", "{s} works as a {a}.")
    return rng.choice(forms).format(s=subject, a=answer)


def _fact_candidates(info: dict[str, Any], rng: random.Random) -> dict[str, str]:
    relation, subject, answer = info["relation"], info["subject"], info["answer"]
    rivals = tuple(CAPITALS.values()) if relation == "capital" else PROFESSIONS
    wrong = _other(rivals, answer, rng)
    first, second = rng.sample([answer, wrong], 2)
    hedge = (
        f"It is either {first} or {second}."
        if relation == "capital"
        else f"{subject} is a {first} or a {second}."
    )
    return {
        "ideal": _fact_answer(relation, subject, answer, rng),
        "hedge": hedge,
        "wrong": _fact_answer(relation, subject, wrong, rng),
        "refusal": BARE_REFUSAL,
    }


def _wrong_number(answer: int, rng: random.Random) -> int:
    return rng.choice([n for n in (answer + d for d in (-3, -2, -1, 1, 2, 3, 10)) if n >= 0])


def _arithmetic_candidates(info: dict[str, Any], rng: random.Random) -> dict[str, str]:
    a, b, answer = info["a"], info["b"], info["answer"]
    forms = ("The answer is {n}.", "{n}.", "It is {n}.")
    symbol = {"add": "plus", "sub": "minus", "mul": "times"}[info["op"]]
    return {
        "ideal": rng.choice(forms).format(n=answer),
        "restated": f"{a} {symbol} {b} is {answer}.",
        "wrong": rng.choice(forms).format(n=_wrong_number(answer, rng)),
        "refusal": BARE_REFUSAL,
    }


def _format_candidates(info: dict[str, Any], rng: random.Random) -> dict[str, str]:
    rule, answer = info["rule"], info["answer"]
    if rule == "one_word":
        rivals = tuple(CAPITALS.values()) if info["relation"] == "capital" else PROFESSIONS
        ideal = f"{answer.capitalize()}."
        wrong_format = _fact_answer(info["relation"], info["subject"], answer, rng)
        wrong = f"{_other(rivals, answer, rng).capitalize()}."
    elif rule == "yes_no":
        ideal, wrong = ("Yes.", "No.") if answer == "yes" else ("No.", "Yes.")
        if info["kind"] == "yes_no_capital":
            claim = f"{info['city']} {'is' if answer == 'yes' else 'is not'} the capital of {info['country']}"
        else:
            claim = f"{info['person']} {'is' if answer == 'yes' else 'is not'} a {info['job']}"
        wrong_format = f"{ideal[:-1]}, {claim}."
    elif rule == "only_number":
        ideal = f"{answer}."
        wrong_format = f"The answer is {answer}."
        wrong = f"{_wrong_number(int(answer), rng)}."
    elif rule == "list_three":
        items = LIST_ITEMS[info["things"]]
        ideal = _join_list(rng.sample(items, 3))
        wrong_format = _join_list(rng.sample(items, rng.choice((2, 4))))
        others = sorted(
            {w for things, ws in LIST_ITEMS.items() if things != info["things"] for w in ws} - set(items)
        )
        wrong = _join_list(rng.sample(others, 3))
    else:  # repeat
        word = info["word"].lower()
        ideal = f"{word.capitalize()} {word} {word}."
        wrong_format = rng.choice(
            (f"{word.capitalize()} {word}.", f"Sure! {word.capitalize()} {word} {word}.")
        )
        wrong_word = _other(REPEAT_WORDS, word, rng)
        wrong = f"{wrong_word.capitalize()} {wrong_word} {wrong_word}."
    return {"ideal": ideal, "wrong_format": wrong_format, "wrong": wrong, "refusal": BARE_REFUSAL}


def _join_list(items: list[str]) -> str:
    """["red", "blue", "green"] -> "Red, blue, and green." """
    head = ", ".join(items[:-1]) + ("," if len(items) > 2 else "")
    return f"{head} and {items[-1]}.".capitalize()


def candidate_responses(info: dict[str, Any], rng: random.Random) -> dict[str, str]:
    """One response of each type in ``CANDIDATE_ORDER[info["task"]]`` for a classified prompt.

    ``"ideal"`` is the demonstration answer; the others are the deliberate flaws (a wrong fact, a preachy
    refusal, placeholder compliance, an over-refusal, the wrong format ...) used as imperfect
    demonstrations and as the lower-ranked candidates of the comparisons.
    """
    task = info["task"]
    if task == "fact":
        return _fact_candidates(info, rng)
    if task == "arithmetic":
        return _arithmetic_candidates(info, rng)
    if task == "format":
        return _format_candidates(info, rng)
    if task == "disallowed":
        return {
            "ideal": rng.choice(REFUSALS),
            "bare_refusal": BARE_REFUSAL,
            "preachy": rng.choice(PREACHY_REFUSALS),
            "compliance": rng.choice(COMPLIANCE),
        }
    topic = TOPIC_BY_SUBJECT[info["subject"]]
    return {
        "ideal": topic.answer,
        "partial": topic.partial,
        "over_refusal": rng.choice(OVER_REFUSALS),
        "preachy": rng.choice(SENSITIVE_PREACHY),
    }
