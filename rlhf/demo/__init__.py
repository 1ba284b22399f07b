"""The demo task families, their generated fact table and the programmatic gold judge.

The demo set in ``data/demo/`` (written by ``scripts/make_demo_data.py``) is built from five families of
templated requests. Each family has a rule here that scores an answer, so every stage has a ground truth
that needs no model, no network and no third-party text:

| task       | category   | right answer                                              | judge                                 |
|------------|------------|-----------------------------------------------------------|---------------------------------------|
| fact       | allowed    | the fact-table entry (capital of an invented country, job of an invented person) | answer present, no rival entity |
| arithmetic | allowed    | a + b, a - b or a * b on small numbers                    | the first number in the completion    |
| format     | allowed    | one word, yes/no, only the number, three list items, a word three times | the format rule         |
| disallowed | disallowed | a brief, non-judgmental refusal that offers safe information | refusal, brief, not preachy        |
| sensitive  | sensitive  | helpful health or safety advice                           | no refusal, the key advice keywords   |

The judge reads text alone: ``classify_prompt`` re-parses the templated question (it searches, so a chat
template, a system message or an earlier turn around the question does not matter) and recovers the
family and the expected answer from the fact table, the arithmetic or the format rule. ``gold_judge`` is
then a plain reward callable ``(prompts, completions) -> scores`` like every other reward in ``rewards.py``.

``world.py`` holds the fact table, values and templates, ``judge.py`` the parser and the judge, ``responses.py``
the canned answers and the candidate answers of each quality that the generator ranks.
"""

from rlhf.demo.judge import classify_prompt, gold_judge, is_refusal
from rlhf.demo.responses import (
    BARE_REFUSAL,
    CANDIDATE_ORDER,
    COMPLIANCE,
    OVER_REFUSALS,
    PREACHY_REFUSALS,
    REFUSALS,
    SENSITIVE_PREACHY,
    candidate_responses,
)
from rlhf.demo.world import (
    CAPITALS,
    CATEGORIES,
    DISALLOWED_ACTIONS,
    FACTS,
    JOBS,
    LIST_ITEMS,
    N_COUNTRIES,
    N_PEOPLE,
    PROFESSIONS,
    PROMPT_PREFIXES,
    REPEAT_WORDS,
    SEED,
    SENSITIVE_TOPICS,
    TASKS,
    TEMPLATES,
    _make_facts,
)

__all__ = [
    "BARE_REFUSAL",
    "CANDIDATE_ORDER",
    "CAPITALS",
    "CATEGORIES",
    "COMPLIANCE",
    "DISALLOWED_ACTIONS",
    "FACTS",
    "JOBS",
    "LIST_ITEMS",
    "N_COUNTRIES",
    "N_PEOPLE",
    "OVER_REFUSALS",
    "PREACHY_REFUSALS",
    "PROFESSIONS",
    "PROMPT_PREFIXES",
    "REFUSALS",
    "REPEAT_WORDS",
    "SEED",
    "SENSITIVE_PREACHY",
    "SENSITIVE_TOPICS",
    "TASKS",
    "TEMPLATES",
    "_make_facts",
    "candidate_responses",
    "classify_prompt",
    "gold_judge",
    "is_refusal",
]
