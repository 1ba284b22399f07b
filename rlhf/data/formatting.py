"""One formatting path for every stage (the chat template), tokenisation with assistant-only labels, summaries."""

from __future__ import annotations

from typing import Any

from rlhf.data.rows import RowError
from rlhf.data.sources import DataError, Report, problem_at

# Formatting and tokenisation (one path for every stage)


def render_prompt(tokenizer, prompt: list[dict[str, str]]) -> str:
    """The text every stage feeds the model before an answer: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (its text and end-of-turn token).

    Spans come from rendering growing prefixes, so they work for any template, with or without
    `{% generation %}` markers; a template that is not prefix-consistent is an error, not a silent empty mask.
    """
    full = render_conversation(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True
        )
        end_text = render_conversation(tokenizer, messages[: index + 1]).rstrip()
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise RowError("chat template is not prefix-consistent; cannot locate assistant turns")
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_demonstration(tokenizer, messages: list[dict[str, str]], max_length: int | None, overflow: str):
    """-> {"input_ids", "labels"} with labels -100 outside assistant turns, or (None, drop reason)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        token if any(s < end and e > start for start, end in spans) else -100
        for token, (s, e) in zip(ids, offsets, strict=True)
    ]
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop":
            return None, "over max_length"
        trainable = any(label != -100 for label in labels)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels):
            return {"input_ids": ids, "labels": labels}, "truncated"
        if trainable:
            # The cut falls before the first answer (a long first user turn): the row is over-length, not
            # unmasked, and truncating it leaves nothing to train on, so it is dropped and counted as such.
            return None, "over max_length"
    if all(label == -100 for label in labels):
        return None, "no trainable (assistant) tokens"
    return {"input_ids": ids, "labels": labels}, None


def tokenize_demonstrations(
    tokenizer, rows: list[dict], max_length: int | None, overflow: str, on_empty: str, report: Report
):
    """Tokenise all rows; over-length and empty-mask rows are counted in `report` (empty masks may be errors)."""
    out, problems = [], []
    for row in rows:
        try:
            encoded, reason = tokenize_demonstration(tokenizer, row["messages"], max_length, overflow)
        except RowError as err:
            problems.append(problem_at(row, str(err)))
            continue
        if reason == "truncated":
            report.truncated += 1
        elif encoded is None:
            if reason.startswith("no trainable") and on_empty == "error":
                problems.append(problem_at(row, f"messages: {reason} (set on_empty_mask: drop to skip)"))
            report.drop(reason)
            continue
        out.append(encoded)
    if problems:
        raise DataError(problems)
    report.kept = len(out)
    return out


# A template for tokenizers that ship none. `{% generation %}` marks assistant text so TRL and
# `return_assistant_tokens_mask` agree with our own offset-based masks.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Summaries for `rlhf data validate`


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def summarise(kind: str, rows: list[dict[str, Any]], tokenizer=None) -> dict[str, Any]:
    summary: dict[str, Any] = {"kind": kind, "examples": len(rows)}
    if kind == "sft":
        summary["turns"] = percentiles([len(r["messages"]) for r in rows])
        texts = [render_conversation(tokenizer, r["messages"]) for r in rows] if tokenizer else []
    elif kind == "pairs":
        summary["groups"] = len({r["group"] for r in rows})
        texts = [render_conversation(tokenizer, r["prompt"] + r["chosen"]) for r in rows] if tokenizer else []
    else:
        categories: dict[str, int] = {}
        for r in rows:
            categories[str(r.get("category"))] = categories.get(str(r.get("category")), 0) + 1
        summary["categories"] = categories
        texts = [render_prompt(tokenizer, r["prompt"]) for r in rows] if tokenizer else []
    if texts:
        summary["tokens"] = percentiles(
            [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        )
    return summary
