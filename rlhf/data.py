"""The one data module: every dataset the stages read goes through here.

Sources are local JSON / JSONL / Parquet / CSV files, directories of them, or dataset names for
`datasets.load_dataset` (``name`` or ``name:split``). Each row is normalised to a fixed schema per *purpose*,
not per stage:

- demonstrations: ``{"messages": [...]}``
- preferences:    ``{"prompt": [...], "chosen": [...], "rejected": [...], "group": int, "margin": float | None}``
- prompts:        ``{"prompt": [...], "category": str | None, **extra}``

Messages are ``{"role": "system" | "user" | "assistant", "content": str}``. Validation collects every problem as
``PATH:LINE: what is wrong (field, expected, found)`` before any model is loaded; callers raise `DataError`.

Malformed rows (not JSON, a missing or mistyped field, no assistant turn) are errors. Well-formed but degenerate
rows are data, handled by one policy and counted in the `Report`: an empty assistant answer is kept (real
labellers sometimes prefer silence to a harmful answer); a pair whose answers are identical, or a conversation
with an empty user or system turn, is dropped (`on_degenerate="drop"`, the default) or reported as an error
(`"error"`). Prompt files are the exception: a blank prompt is an error, since the row has nothing else in it.
One prompt-formatting path (`render_prompt`, the tokenizer's chat template) serves all stages, so SFT, the reward
model and PPO see identical prompt text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "pairs", "prompts")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
DEGENERATE_POLICIES = ("drop", "error")
IDENTICAL = "identical answers"  # drop reason: a pair (or two ranked answers) with the same text
MESSAGE_FIELDS = ("messages", "prompt", "chosen", "rejected")

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
# Problems and errors


@dataclass
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def problem_at(row: dict[str, Any], message: str) -> Problem:
    """A problem located by a loaded row's `source` ("PATH:LINE")."""
    path, _, line = row["source"].rpartition(":")
    return Problem(path, int(line), message)


class DegenerateRow(ValueError):
    """A well-formed row the policy drops; `reason` is the count's key, the message says where."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class DataError(Exception):
    """Bad input. Carries every problem found so the user fixes them in one pass."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more problems" if len(problems) > 50 else ""
        super().__init__(shown + more)


@dataclass
class Record:
    """One raw row and where it came from (line is 1-based; CSV counts the header, Parquet/hub rows count from 1)."""

    path: str
    line: int
    row: dict[str, Any]


@dataclass
class Report:
    """What loading did: rows read, kept, and every drop with its reason (never silent).

    `rows` counts source rows; `kept` counts examples (a K-way ranking row gives K(K-1)/2 pairs); drops count
    source rows for degenerate data and examples for over-length ones. `empty_answers` counts kept examples with
    an empty assistant turn.
    """

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    empty_answers: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    dropped_at: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def drop(self, reason: str, where: Problem | None = None) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if where is not None:
            self.dropped_at.append(where)

    def counts(self) -> dict[str, Any]:
        """The figures `rlhf data validate` prints and stages write into their manifest."""
        return {
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.drops.items())),
            "empty_answers_kept": self.empty_answers,
            "truncated": self.truncated,
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.drops.items())) or "none"
        return (
            f"{self.rows} rows read, {self.kept} kept ({self.truncated} truncated, "
            f"{self.empty_answers} with an empty answer), dropped: {dropped}"
        )


# --------------------------------------------------------------------------------------------------------------
# Reading raw records


def expand_sources(sources: str | list[str]) -> list[str]:
    """Files in the order given; a directory contributes its data files, sorted, recursively."""
    out: list[str] = []
    for source in [sources] if isinstance(sources, str) else sources:
        if os.path.isdir(source):
            out.extend(
                str(p) for p in sorted(Path(source).rglob("*")) if p.is_file() and p.suffix in FILE_SUFFIXES
            )
        else:
            out.append(source)
    return out


def looks_like_hub_name(source: str) -> bool:
    return (
        not os.path.exists(source)
        and not source.endswith(FILE_SUFFIXES)
        and not source.startswith((".", "/"))
    )


def read_records(source: str, problems: list[Problem]) -> Iterator[Record]:
    """Yield the rows of one file (or hub dataset); append read errors (bad JSON, bad bytes) to `problems`."""
    if looks_like_hub_name(source):
        yield from _read_hub(source)
        return
    if not os.path.exists(source):
        problems.append(Problem(source, 0, "file not found"))
        return
    data = Path(source).read_bytes()
    if not data.strip():
        problems.append(Problem(source, 1, "empty file (no records)"))
        return
    suffix = Path(source).suffix
    if suffix == ".parquet":
        yield from _read_parquet(source)
        return
    text = _decode(source, data, problems)
    if text is None:
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield Record(source, reader.line_num, dict(row))
    elif suffix == ".json" or text.lstrip().startswith("["):
        yield from _read_json_array(source, text, problems)
    else:
        yield from _read_jsonl(source, text, problems)


def _decode(path: str, data: bytes, problems: list[Problem]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        problems.append(
            Problem(path, line, f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})")
        )
        return None


def _read_jsonl(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(path, number, f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(path, number, f"expected a JSON object, found {type(row).__name__}"))
            continue
        yield Record(path, number, row)


def _read_json_array(path: str, text: str, problems: list[Problem]) -> Iterator[Record]:
    """A JSON file holding a list of objects (or {"data": [...]}); line numbers point at each object's start."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        problems.append(Problem(path, err.lineno, f"malformed JSON ({err.msg} at column {err.colno})"))
        return
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if not isinstance(parsed, list):
        problems.append(Problem(path, 1, 'expected a list of objects (or {"data": [...]})'))
        return
    # Objects' own opening braces are found by walking the decoder, so nested braces don't shift line numbers.
    decoder, position, lines = json.JSONDecoder(), text.index("[") + 1, []
    for _ in parsed:
        while text[position] in " \t\r\n,":
            position += 1
        lines.append(text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)
    for row, line in zip(parsed, lines, strict=True):
        if not isinstance(row, dict):
            problems.append(Problem(path, line, f"expected a JSON object, found {type(row).__name__}"))
            continue
        yield Record(path, line, row)


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # datasets depends on pyarrow

    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield Record(path, index, row)


def _read_hub(source: str) -> Iterator[Record]:
    import datasets

    name, _, split = source.partition(":")
    dataset = datasets.load_dataset(name, split=split or "train")
    for index, row in enumerate(dataset, start=1):
        yield Record(source, index, dict(row))


def content_hash(sources: str | list[str]) -> dict[str, str]:
    """sha256 of each local source file (hub names map to their name): recorded in manifests."""
    hashes = {}
    for path in expand_sources(sources):
        if os.path.isfile(path):
            hashes[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        else:
            hashes[path] = "hub:" + path
    return hashes


# --------------------------------------------------------------------------------------------------------------
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
        messages = _as_messages(row["prompt"], "prompt", "user") + _as_messages(
            row["completion"], "completion", "assistant"
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
    if row.get("margin") is None:
        return None
    try:
        value = float(row["margin"])
    except (TypeError, ValueError):
        raise RowError(f"margin: expected a number, found {row['margin']!r}") from None
    if value != value:
        raise RowError("margin: expected a number, found NaN")
    return value


def preferences_from_row(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Explicit pair, implicit-prompt pair (HH-RLHF included) or K-way ranking -> list of pairs (group set later)."""
    margin = _margin(row)
    if "responses" in row:
        return _ranking_pairs(row, margin)
    chosen_raw, rejected_raw = _require(row, "chosen"), _require(row, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _check_prompt(_as_messages(row["prompt"], "prompt", "user"), "prompt")
        chosen = _check_completion(_as_messages(chosen_raw, "chosen", "assistant"), "chosen")
        rejected = _check_completion(_as_messages(rejected_raw, "rejected", "assistant"), "rejected")
    else:
        full_chosen = _as_messages(chosen_raw, "chosen", "assistant")
        full_rejected = _as_messages(rejected_raw, "rejected", "assistant")
        prompt, chosen, rejected = split_shared_prefix(full_chosen, full_rejected)
        chosen, rejected = _check_completion(chosen, "chosen"), _check_completion(rejected, "rejected")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}]


def _ranking_pairs(row: dict[str, Any], margin: float | None) -> list[dict[str, Any]]:
    """InstructGPT K-way ranking: K answers best-to-worst -> all K(K-1)/2 (better, worse) pairs."""
    prompt = _check_prompt(_as_messages(_require(row, "prompt"), "prompt", "user"), "prompt")
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError(f"responses: expected a list of at least 2 answers, found {_kind(responses)}")
    answers = [_as_messages(r, f"responses[{i}]", "assistant") for i, r in enumerate(responses)]
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


def prompt_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """`prompt` (string or messages) or `messages` ending on a user turn; `category` and extra columns kept."""
    if "prompt" in row and row["prompt"] is not None:
        prompt = _as_messages(row["prompt"], "prompt", "user")
        key = "prompt"
    elif "messages" in row:
        prompt, key = check_messages(row["messages"], "messages"), "messages"
    else:
        raise RowError(f"prompt: missing required field (found keys {sorted(row)})")
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise RowError(f"category: expected a string, found {_kind(category)}")
    if isinstance(row.get(key), str) and not row[key].strip():
        raise RowError(f"{key}: blank text")
    blank = next((i for i, m in enumerate(prompt) if not m["content"].strip()), None)
    if blank is not None:
        raise RowError(f"{key}[{blank}].content: empty content")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "category")}
    return {**extra, "prompt": _check_prompt(prompt, key), "category": category}


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
                rows = to_rows(record.row)
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


def load_prompts(sources: str | list[str]) -> tuple[list[dict[str, Any]], Report]:
    return _load(sources, lambda row: [prompt_from_row(row)], on_degenerate=None)


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
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels):
            return {"input_ids": ids, "labels": labels}, "truncated"
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
