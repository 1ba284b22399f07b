"""The one data module: every dataset the stages read goes through here.

Sources are local JSON / JSONL / Parquet / CSV files, directories of them, or dataset names for
`datasets.load_dataset` (``name`` or ``name:split``). Each row is normalised to a fixed schema per *purpose*,
not per stage:

- demonstrations: ``{"messages": [...]}``
- preferences:    ``{"prompt": [...], "chosen": [...], "rejected": [...], "group": int, "margin": float | None}``
- prompts:        ``{"prompt": [...], "category": one of PROMPT_CLASSES | None, **extra}``

Messages are ``{"role": "system" | "user" | "assistant", "content": str}``. Validation collects every problem as
``PATH:LINE: what is wrong (field, expected, found)`` before any model is loaded; callers raise `DataError`.

Malformed rows (not JSON, a missing or mistyped field, no assistant turn) are errors. Well-formed but degenerate
rows are data, handled by one policy and counted in the `Report`: an empty assistant answer is kept (real
labellers sometimes prefer silence to a harmful answer); a pair whose answers are identical, or a conversation
with an empty user or system turn, is dropped (`on_degenerate="drop"`, the default) or reported as an error
(`"error"`). Prompt files are the exception: a blank prompt is an error, since the row has nothing else in it.
`sources.py` reads records and holds the problem and report types, `rows.py` normalises rows per purpose
and loads them, `formatting.py` renders and tokenises. One prompt-formatting path (`render_prompt`, the tokenizer's chat template) serves all stages, so SFT, the reward
model and PPO see identical prompt text.
"""

from rlhf.data.formatting import (
    DEFAULT_CHAT_TEMPLATE,
    assistant_spans,
    percentiles,
    render_conversation,
    render_prompt,
    summarise,
    tokenize_demonstration,
    tokenize_demonstrations,
)
from rlhf.data.rows import (
    DEGENERATE_POLICIES,
    HH_TURN,
    IDENTICAL,
    LOADERS,
    MESSAGE_FIELDS,
    PROMPT_CLASSES,
    ROLES,
    RowError,
    check_degenerate,
    check_messages,
    conversation_key,
    demonstration_from_row,
    has_empty_answer,
    is_hh_transcript,
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_scored_answers,
    parse_hh_transcript,
    preferences_from_row,
    prompt_from_row,
    split_last_rows,
    split_shared_prefix,
)
from rlhf.data.sources import (
    FILE_SUFFIXES,
    DataError,
    DegenerateRow,
    Problem,
    Record,
    Report,
    content_hash,
    expand_sources,
    looks_like_hub_name,
    problem_at,
    read_records,
)

__all__ = [
    "assistant_spans",
    "check_degenerate",
    "check_messages",
    "content_hash",
    "conversation_key",
    "DataError",
    "DEFAULT_CHAT_TEMPLATE",
    "DEGENERATE_POLICIES",
    "DegenerateRow",
    "demonstration_from_row",
    "expand_sources",
    "FILE_SUFFIXES",
    "has_empty_answer",
    "HH_TURN",
    "IDENTICAL",
    "is_hh_transcript",
    "load_demonstrations",
    "load_preferences",
    "load_prompts",
    "load_scored_answers",
    "LOADERS",
    "looks_like_hub_name",
    "MESSAGE_FIELDS",
    "parse_hh_transcript",
    "percentiles",
    "preferences_from_row",
    "Problem",
    "problem_at",
    "PROMPT_CLASSES",
    "prompt_from_row",
    "read_records",
    "Record",
    "render_conversation",
    "render_prompt",
    "Report",
    "ROLES",
    "RowError",
    "split_last_rows",
    "split_shared_prefix",
    "summarise",
    "tokenize_demonstration",
    "tokenize_demonstrations",
]
