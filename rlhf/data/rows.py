"""Rows to the fixed schema of each purpose (demonstrations, preferences, prompts), the degenerate-row policy,
the loaders and the held-out splits."""

from __future__ import annotations

import decimal
import math
import numbers
import re
from typing import Any

from rlhf.data.sources import (
    DataError,
    DegenerateRow,
    Problem,
    Report,
    expand_sources,
    problem_at,
    read_records,
)

# Prompt categories, checked here before any model loads. Defined in the data module because `rlhf.safety` reads
# its data through this one: importing the safety package from here would be an import cycle.
PROMPT_CLASSES = ("allowed", "sensitive", "disallowed")

# Field mapping: raw row -> messages


class RowError(ValueError):
    """A problem with one row; the loader turns it into `PATH:LINE: message`."""


def parse_hh_transcript(text: str, field_name: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (multi-turn) -> messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(f"{field_name}: text before the first 'Human:' turn ({parts[0][:30]!r})")
    if len(parts) < 3:
        raise RowError(f"{field_name}: expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns, found none")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [
        {"role": roles[speaker], "content": body.strip()}
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    return check_messages(messages, field_name)


def is_hh_transcript(value: Any) -> bool:
    return isinstance(value, str) and bool(HH_TURN.match(value))


def check_messages(messages: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{field_name}: expected a non-empty list of messages, found {_kind(messages)}")
    out = []
    for index, message in enumerate(messages):
        where = f"{field_name}[{index}]"
        if not isinstance(message, dict):
            raise RowError(f"{where}: expected an object with role and content, found {_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"{where}.role: expected one of system/user/assistant, found {role!r}")
        if not isinstance(content, str):
            raise RowError(f"{where}.content: expected a string, found {_kind(content)}")
        # Blank content is well-formed: `degenerate_reason` applies the policy once the whole row is checked.
        out.append({"role": role, "content": content})
    return out


def _as_messages(value: Any, field_name: str, role: str) -> list[dict[str, str]]:
    """A string becomes one message with `role`; a list is checked as messages; HH transcripts are parsed."""
    if is_hh_transcript(value):
        return parse_hh_transcript(value, field_name)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, field_name)


def _ends_with_generation_cue(prompt: Any) -> bool:
    """HH text ending in an empty 'Assistant:' turn ("\\n\\nHuman: ...\\n\\nAssistant:", as in Dahoas rm-static):
    the cue for the answer that follows, not an answer of its own."""
    return is_hh_transcript(prompt) and HH_CUE.search(prompt) is not None


def _prompt_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    """A prompt field as messages, without the generation cue an HH-style prompt ends with."""
    messages = _as_messages(value, field_name, "user")
    return messages[:-1] if _ends_with_generation_cue(value) else messages


def _continuing(prompt: Any, answer: Any) -> Any:
    """After a prompt ending in the generation cue, a string answer continues that transcript (" Mix flour...")
    and is stripped as the transcript's own turns are."""
    if _ends_with_generation_cue(prompt) and isinstance(answer, str) and not is_hh_transcript(answer):
        return answer.strip()
    return answer


def _answer_messages(value: Any, field_name: str, prompt: Any) -> list[dict[str, str]]:
    """An answer field as messages."""
    return _as_messages(_continuing(prompt, value), field_name, "assistant")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(f"{name}: missing required field")
    return row[name]


def demonstration_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """Conversational, prompt/completion, Alpaca or raw HH-RLHF row -> {"messages": [...]}."""
    if "messages" in row:
        messages = check_messages(row["messages"], "messages")
    elif "prompt" in row and "completion" in row:
        messages = _prompt_messages(row["prompt"], "prompt") + _answer_messages(
            row["completion"], "completion", row["prompt"]
        )
    elif "instruction" in row:
        instruction = row["instruction"]
        if not isinstance(instruction, str):
            raise RowError(f"instruction: expected a string, found {_kind(instruction)}")
        extra = row.get("input") or ""
        user = instruction if not str(extra).strip() else f"{instruction}\n\n{extra}"
        output = row.get("output")
        if not isinstance(output, str):
            raise RowError(f"output: expected a string, found {_kind(output)}")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif is_hh_transcript(row.get("text")) or is_hh_transcript(row.get("chosen")):
        key = "text" if is_hh_transcript(row.get("text")) else "chosen"
        messages = parse_hh_transcript(row[key], key)
    else:
        raise RowError(
            "messages: missing required field (expected 'messages', 'prompt'+'completion', "
            f"'instruction'+'output' or an HH-RLHF 'text'; found keys {sorted(row)})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages: conversation has no assistant turn")
    return {"messages": messages}


def split_shared_prefix(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit-prompt pair -> (prompt, chosen tail, rejected tail), split at a turn boundary.

    The split is by whole messages, never by characters, so two answers that diverge mid-turn ("The answer is 4"
    vs "The answer is 5") keep their whole assistant turn and the prompt ends on the user turn before it.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise DegenerateRow(IDENTICAL, "chosen: identical to rejected")
    prompt = chosen[:shared]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(
            "chosen/rejected: the two conversations do not diverge at an assistant turn after a user turn"
        )
    return prompt, chosen[shared:], rejected[shared:]


def _check_prompt(prompt: list[dict], field_name: str) -> list[dict]:
    if not prompt:  # HH text holding only the 'Assistant:' cue
        raise RowError(f"{field_name}: expected a conversation ending on a user turn, found no turns")
    if prompt[-1]["role"] != "user":
        raise RowError(
            f"{field_name}: expected the conversation to end on a user turn, found {prompt[-1]['role']!r}"
        )
    return prompt


def _check_completion(messages: list[dict], field_name: str) -> list[dict]:
    if not messages:
        raise RowError(f"{field_name}: no assistant answer after the shared conversation")
    if messages[0]["role"] != "assistant":
        raise RowError(f"{field_name}: expected an assistant answer, found role {messages[0]['role']!r}")
    return messages


def _margin(row: dict[str, Any]) -> float | None:
    """A finite real number (a Parquet decimal, or a string that spells one, too), or None. Not a bool: an int to
    Python, but no margin."""
    margin = row.get("margin")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (numbers.Real, decimal.Decimal, str)):
        raise RowError(f"margin: expected a finite number, found {_kind(margin)} {margin!r}")
    try:
        value = float(margin)
    except ValueError:
        raise RowError(f"margin: expected a finite number, found {_kind(margin)} {margin!r}") from None
    except OverflowError:
        raise RowError("margin: expected a finite number, found an integer beyond the float range") from None
    if not math.isfinite(value):  # JSON's Infinity and NaN, or a literal like 1e400 that overflows to inf
        raise RowError(f"margin: expected a finite number, found {value}")
    return value


def _from_text_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row, whose cells are all text: an empty optional cell (`margin`, `category`) is a missing value (a
    margin written out is read by `_margin`, as a JSON string one is). Other cells stay as written: an empty
    answer cell is an empty answer."""
    return {
        name: None if name in OPTIONAL_FIELDS and (cell is None or not cell.strip()) else cell
        for name, cell in row.items()
    }


def preferences_from_row(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Explicit pair, implicit-prompt pair (HH-RLHF included) or K-way ranking -> list of pairs (group set later)."""
    margin = _margin(row)
    # A null field is an absent one: a Parquet or hub dataset mixing pairs and rankings has every column.
    if row.get("responses") is not None:
        both = [name for name in ("chosen", "rejected") if row.get(name) is not None]
        if both:
            raise RowError(
                f"responses: a ranking ('responses') and a pair ({'/'.join(both)}) in one row; give one of them"
            )
        return _ranking_pairs(row, margin)
    chosen_raw, rejected_raw = _require(row, "chosen"), _require(row, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _check_prompt(_prompt_messages(row["prompt"], "prompt"), "prompt")
        chosen = _check_completion(_answer_messages(chosen_raw, "chosen", row["prompt"]), "chosen")
        rejected = _check_completion(_answer_messages(rejected_raw, "rejected", row["prompt"]), "rejected")
    else:
        full_chosen = _as_messages(chosen_raw, "chosen", "assistant")
        full_rejected = _as_messages(rejected_raw, "rejected", "assistant")
        prompt, chosen, rejected = split_shared_prefix(full_chosen, full_rejected)
        chosen, rejected = _check_completion(chosen, "chosen"), _check_completion(rejected, "rejected")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}]


def _ranking_pairs(row: dict[str, Any], margin: float | None) -> list[dict[str, Any]]:
    """InstructGPT K-way ranking: K answers best-to-worst -> all K(K-1)/2 (better, worse) pairs."""
    prompt = _check_prompt(_prompt_messages(_require(row, "prompt"), "prompt"), "prompt")
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError(f"responses: expected a list of at least 2 answers, found {_kind(responses)}")
    # Each answer is checked as a pair's answer is: it starts with an assistant turn.
    answers = [
        _check_completion(_answer_messages(r, f"responses[{i}]", row["prompt"]), f"responses[{i}]")
        for i, r in enumerate(responses)
    ]
    ranking = row.get("ranking")
    if ranking is None:
        ranking = list(range(len(answers)))
    if not isinstance(ranking, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ranking
    ):
        raise RowError(f"ranking: expected a list of indices, found {ranking!r}")
    bad = [i for i in ranking if not 0 <= i < len(answers)]
    if bad:
        raise RowError(f"ranking: index {bad[0]} out of range for {len(answers)} responses")
    if len(set(ranking)) != len(ranking) or len(ranking) != len(answers):
        raise RowError(f"ranking: expected a permutation of 0..{len(answers) - 1}, found {ranking}")
    ordered = [answers[i] for i in ranking]
    pairs = []
    for better in range(len(ordered)):
        for worse in range(better + 1, len(ordered)):
            if ordered[better] == ordered[worse]:
                message = f"responses: answers {ranking[better]} and {ranking[worse]} are identical"
                raise DegenerateRow(IDENTICAL, message)
            pairs.append(
                {"prompt": prompt, "chosen": ordered[better], "rejected": ordered[worse], "margin": margin}
            )
    return pairs


def prompt_from_row(
    row: dict[str, Any], categories: tuple[str, ...] | None = PROMPT_CLASSES
) -> dict[str, Any]:
    """`prompt` (string or messages) or `messages` ending on a user turn; `category` and extra columns kept.

    `category` is one of `categories` (PPO and evaluation hand it to the safety reward as the prompt's class), or
    with `categories=None` any string (a label rows are filtered by).
    """
    if "prompt" in row and row["prompt"] is not None:
        prompt = _prompt_messages(row["prompt"], "prompt")
        key = "prompt"
    elif "messages" in row:
        prompt, key = check_messages(row["messages"], "messages"), "messages"
    else:
        raise RowError(f"prompt: missing required field (found keys {sorted(row)})")
    category = row.get("category")  # None: no category, so PPO and evaluation classify the prompt
    if category is not None and categories is not None and category not in categories:
        raise RowError(f"category: expected one of {'/'.join(categories)} or null, found {category!r}")
    if category is not None and not isinstance(category, str):
        raise RowError(f"category: expected a string, found {_kind(category)}")
    if isinstance(row.get(key), str) and not row[key].strip():
        raise RowError(f"{key}: blank text")
    blank = next((i for i, m in enumerate(prompt) if not m["content"].strip()), None)
    if blank is not None:
        raise RowError(f"{key}[{blank}].content: empty content")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "category")}
    return {**extra, "prompt": _check_prompt(prompt, key), "category": category}


def scored_answers_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A prompt with the answers a reward model scores: `response` (a string) or `responses` (a list of them),
    returned as `responses`. The reward model does not read `category`: here it is any label to filter by."""
    example = prompt_from_row(row, categories=None)
    if row.get("responses") is not None:
        answers = row["responses"]
        if not isinstance(answers, list) or not answers:
            found = "an empty list" if answers == [] else _kind(answers)
            raise RowError(f"responses: expected a non-empty list of strings, found {found}")
        bad = next((i for i, answer in enumerate(answers) if not isinstance(answer, str)), None)
        if bad is not None:
            raise RowError(f"responses[{bad}]: expected a string, found {_kind(answers[bad])}")
    elif row.get("response") is None:
        raise RowError("response: missing required field (or 'responses')")
    elif not isinstance(row["response"], str):
        raise RowError(f"response: expected a string, found {_kind(row['response'])}")
    else:
        answers = [row["response"]]
    return {**example, "responses": [_continuing(row.get("prompt"), answer) for answer in answers]}


ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
HH_CUE = re.compile(r"\n\nAssistant:\s*\Z")  # a transcript ending in an empty assistant turn
OPTIONAL_FIELDS = ("margin", "category")  # an empty CSV cell in these columns means "not given"
DEGENERATE_POLICIES = ("drop", "error")
IDENTICAL = "identical answers"  # drop reason: a pair (or two ranked answers) with the same text
MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected")


# --------------------------------------------------------------------------------------------------------------
# The degenerate-row policy


def check_degenerate(examples: list[dict[str, Any]]) -> None:
    """Raise `DegenerateRow` for a well-formed row the policy drops: an empty user/system turn, identical answers.

    Runs after the row's structural checks, so a degenerate row never hides a malformed field of its own.
    """
    for example in examples:
        for name in MESSAGE_FIELDS:
            for index, message in enumerate(example.get(name) or []):
                if message["role"] != "assistant" and not message["content"].strip():
                    reason = f"empty {message['role']} turn"
                    raise DegenerateRow(reason, f"{name}[{index}].content: {reason}")
        if "chosen" in example and example["chosen"] == example["rejected"]:
            raise DegenerateRow(IDENTICAL, "chosen: identical to rejected")


def has_empty_answer(example: dict[str, Any]) -> bool:
    """An assistant turn with no text: kept by the policy and scored like any answer (it still ends with EOS)."""
    return any(
        m["role"] == "assistant" and not m["content"].strip()
        for name in MESSAGE_FIELDS
        for m in example.get(name) or []
    )


# --------------------------------------------------------------------------------------------------------------
# Loading per purpose


def _load(
    sources: str | list[str], to_rows, on_degenerate: str | None
) -> tuple[list[dict[str, Any]], Report]:
    """Read, map and check every row; `on_degenerate` None means the purpose has no degenerate rows (prompts)."""
    if on_degenerate is not None and on_degenerate not in DEGENERATE_POLICIES:
        raise ValueError(f"on_degenerate: expected 'drop' or 'error', found {on_degenerate!r}")
    report = Report()
    out: list[dict[str, Any]] = []
    files = expand_sources(sources)
    if not files:
        report.problems.append(Problem(str(sources), 0, "no data files found"))
    for path in files:
        for record in read_records(path, report.problems):
            report.rows += 1
            try:
                rows = to_rows(record.row if record.typed else _from_text_cells(record.row))
                if on_degenerate is not None:
                    check_degenerate(rows)
            except DegenerateRow as err:
                where = Problem(record.path, record.line, str(err))
                if on_degenerate == "error":
                    report.problems.append(where)
                else:
                    report.drop(err.reason, where)
                continue
            except RowError as err:
                report.problems.append(Problem(record.path, record.line, str(err)))
                continue
            for row in rows:
                row["source"] = f"{record.path}:{record.line}"
            out.extend(rows)
    if not out and report.dropped_at and not report.problems:
        # Nothing left to train on: name every dropped row, so the user sees why.
        left = Problem(str(sources), 0, "no usable rows: every row was dropped as degenerate")
        report.problems.extend([*report.dropped_at, left])
    if report.problems:
        raise DataError(report.problems)
    report.kept = len(out)
    report.empty_answers = sum(has_empty_answer(row) for row in out) if on_degenerate else 0
    return out, report


def load_demonstrations(
    sources: str | list[str], on_degenerate: str = "drop"
) -> tuple[list[dict[str, Any]], Report]:
    return _load(sources, lambda row: [demonstration_from_row(row)], on_degenerate)


def load_preferences(
    sources: str | list[str], on_degenerate: str = "drop"
) -> tuple[list[dict[str, Any]], Report]:
    """Pairs with a `group` id: all pairs of one source row (one prompt's ranking) share it."""
    counter = iter(range(1 << 62))

    def to_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
        pairs, group = preferences_from_row(row), next(counter)
        for pair in pairs:
            pair["group"] = group
        return pairs

    return _load(sources, to_rows, on_degenerate)


def load_prompts(
    sources: str | list[str], categories: tuple[str, ...] | None = PROMPT_CLASSES
) -> tuple[list[dict[str, Any]], Report]:
    """Prompt rows; `categories=None` where a category is only a label to group or filter by (`rlhf inspect`)."""
    return _load(sources, lambda row: [prompt_from_row(row, categories)], on_degenerate=None)


def load_scored_answers(sources: str | list[str]) -> tuple[list[dict[str, Any]], Report]:
    """Prompt rows with `response` or `responses`: what `rlhf reward score` and a normalisation reference read."""
    return _load(sources, lambda row: [scored_answers_from_row(row)], on_degenerate=None)


LOADERS = {"sft": load_demonstrations, "pairs": load_preferences, "prompts": load_prompts}


def conversation_key(example: dict[str, Any]) -> str:
    """The opening user turn, space- and case-normalised: rows that start the same conversation share it."""
    messages = example.get("prompt") or example["messages"]
    opening = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(opening.split()).casefold()


def split_last_rows(
    examples: list[dict[str, Any]], count: int, report: Report
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The last `count` source rows as eval, by conversation: no conversation is on both sides.

    All examples of a source row (a ranking's pairs) go together. A training row that opens with the same user
    turn as an eval row (another branch of the same conversation) is dropped from training and counted.
    """
    sources = list(dict.fromkeys(e["source"] for e in examples))
    held = set(sources[len(sources) - count :]) if count > 0 else set()
    eval_rows = [e for e in examples if e["source"] in held]
    eval_keys = {conversation_key(e) for e in eval_rows}
    train_rows = []
    for example in examples:
        if example["source"] in held:
            continue
        if conversation_key(example) in eval_keys:
            report.drop("conversation in eval", problem_at(example, "conversation also in the eval rows"))
            continue
        train_rows.append(example)
    return train_rows, eval_rows


# --------------------------------------------------------------------------------------------------------------
