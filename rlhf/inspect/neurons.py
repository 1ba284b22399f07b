"""Record MLP neuron activations over text: per neuron its top-activating excerpts and random ones.

    rlhf inspect neurons --model CKPT --data FILE... [--out DIR] [--top-k 20] [--random 20] [--heads]

Activations come from forward pre-hooks on each layer's MLP output projection (its input is the neuron vector;
`model_parts.locate` finds it for Llama, Qwen2, GPT-2 and similar models). With `--heads` every attention head
is recorded as a unit too, its activation being the norm of what it writes into the residual stream.

Data: JSON/JSONL/Parquet/CSV rows with a `text` string, or any conversation the data module reads
(demonstrations are rendered with the chat template, prompts with the generation prompt). Texts are cut into
excerpts of `--excerpt-tokens` tokens. Output (no pickle): `activations.safetensors` (excerpt token ids and, per
unit, the indices and per-token activations of its top and random excerpts) and `record.json` (the model, the
data, the token strings), plus `neurons.html`, a page of the strongest units.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import at_least
from rlhf.inspect import InspectError
from rlhf.inspect.explain import Excerpt
from rlhf.inspect.model_parts import (
    ModelParts,
    capture_inputs,
    locate,
    split_heads,
    unit_inputs,
    write_weight,
)

ACTIVATIONS_FILE, RECORD_FILE = "activations.safetensors", "record.json"
# Units are named as in `rlhf inspect logit-diff`: L2.N17 is neuron 17 of layer 2, L0.H3 head 3 of layer 0.
# Stored tensors group them by family: `mlp.2` holds layer 2's neurons, `attn.0` layer 0's heads.
UNIT_NAME = re.compile(r"^L(\d+)\.([NH])(\d+)$")


def unit_name(family: str, index: int) -> str:
    kind, layer = family.split(".")
    return f"L{layer}.{'N' if kind == 'mlp' else 'H'}{index}"


def unit_key(name: str) -> tuple[str, int]:
    """`L2.N17` -> (`mlp.2`, 17); InspectError for anything else."""
    match = UNIT_NAME.match(name)
    if not match:
        raise InspectError(f"unit {name!r}: expected L<layer>.N<neuron> or L<layer>.H<head>, e.g. L1.N5")
    return f"{'mlp' if match[2] == 'N' else 'attn'}.{match[1]}", int(match[3])


# --------------------------------------------------------------------------------------------------------------
# Text in


# Activations are stored at half the size of float32: bfloat16, not float16, whose range (65504) an activation can
# exceed.
STORED = torch.bfloat16


@dataclass
class Document:
    """A data row: plain text, a conversation, or a prompt (rendered with the generation prompt)."""

    text: str | None = None
    messages: list[dict] | None = None
    prompt_only: bool = False


def _document(row: dict) -> Document:
    from rlhf.data import demonstration_from_row, prompt_from_row

    if isinstance(row.get("text"), str):
        return Document(text=row["text"])
    messages = row.get("messages") if isinstance(row.get("messages"), list) else []
    has_answer = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    if has_answer or "completion" in row or "output" in row:
        return Document(messages=demonstration_from_row(row)["messages"])
    return Document(messages=prompt_from_row(row, categories=None)["prompt"], prompt_only=True)


def read_documents(sources: list[str]) -> list[Document]:
    """Every row of the data files; bad rows and empty input are errors naming the file (and line)."""
    from rlhf.data import DataError, Problem, RowError, expand_sources, read_records

    problems: list[Problem] = []
    documents: list[Document] = []
    files = expand_sources(sources)
    if not files:
        raise InspectError(f"{' '.join(sources)}: no data files found")
    for path in files:
        for record in read_records(path, problems):
            try:
                documents.append(_document(record.row))
            except RowError as err:
                problems.append(Problem(record.path, record.line, f"{err} (or a `text` string)"))
    if problems:
        raise DataError(problems)
    if not documents:
        raise InspectError(f"{' '.join(files)}: empty data file (no rows)")
    if all(d.text is not None and not d.text.strip() for d in documents):
        raise InspectError(f"{' '.join(files)}: every text is empty (no tokens to record)")
    return documents


def render(tokenizer, document: Document) -> str:
    from rlhf.data import render_conversation, render_prompt

    if document.text is not None:
        return document.text
    if document.prompt_only:
        return render_prompt(tokenizer, document.messages)
    return render_conversation(tokenizer, document.messages)


def make_excerpts(tokenizer, texts: list[str], excerpt_tokens: int) -> list[list[int]]:
    """Token windows of at most `excerpt_tokens`; a trailing window of fewer than 4 tokens is dropped."""
    excerpts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), excerpt_tokens):
            window = ids[start : start + excerpt_tokens]
            if len(window) >= 4 or start == 0:
                excerpts.append(window)
    return excerpts


def token_strings(tokenizer, excerpts: list[list[int]]) -> list[list[str]]:
    cache: dict[int, str] = {}
    return [[cache.setdefault(i, tokenizer.decode([i])) for i in ids] for ids in excerpts]


# --------------------------------------------------------------------------------------------------------------
# Unit activations


def head_write_norms(parts: ModelParts, layer: int, heads_input: torch.Tensor) -> torch.Tensor:
    """[batch, seq, n_heads]: the norm of each head's write into the residual stream (its output through W_O)."""
    part = parts.layers[layer]
    z = split_heads(heads_input.float(), part.n_heads)  # [B, T, H, d]
    w_o = write_weight(part.attn_out).float().reshape(-1, part.n_heads, part.head_dim)  # [hidden, H, d]
    return torch.einsum("bthd,khd->bthk", z, w_o).norm(dim=-1)


def unit_activations(
    parts: ModelParts, captured: dict[str, torch.Tensor], heads: bool
) -> dict[str, torch.Tensor]:
    """Family name (`mlp.L`, `attn.L`) -> [batch, seq, units] activations from the captured projection inputs."""
    out = {}
    for layer in parts.layers:
        out[f"mlp.{layer.index}"] = captured[f"mlp.{layer.index}"].float()
        if heads:
            out[f"attn.{layer.index}"] = head_write_norms(parts, layer.index, captured[f"attn.{layer.index}"])
    return out


@torch.no_grad()
def forward_units(
    model, parts: ModelParts, batch: list[list[int]], pad_id: int, heads: bool
) -> dict[str, torch.Tensor]:
    """Unit activations [batch, seq, units] for right-padded token windows (pad positions are garbage)."""
    from rlhf.rollout import pad_batch

    ids, mask = pad_batch(batch, pad_id)
    device = next(model.parameters()).device
    with capture_inputs(unit_inputs(parts)) as captured:
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return {k: v.cpu() for k, v in unit_activations(parts, captured, heads).items()}


# --------------------------------------------------------------------------------------------------------------
# Top-k and random excerpts per unit, accumulated batch by batch


@dataclass
class FamilyTop:
    """Running top-k excerpts (by max activation) of every unit in one family."""

    k: int
    index: torch.Tensor | None = None  # [U, k] excerpt indices
    peak: torch.Tensor | None = None  # [U, k] the excerpt's max activation
    acts: torch.Tensor | None = None  # [U, k, T]
    max: torch.Tensor | None = None  # [U] the largest activation seen, at full precision

    def update(self, acts: torch.Tensor, lengths: torch.Tensor, first: int, width: int) -> None:
        """acts [B, T, U] of excerpts first..first+B-1; positions beyond each length do not count."""
        batch = torch.zeros(acts.shape[2], acts.shape[0], width)
        batch[:, :, : acts.shape[1]] = acts.permute(2, 0, 1)
        valid = torch.arange(width)[None, :] < lengths[:, None]  # [B, T]
        peak = batch.masked_fill(~valid[None], float("-inf")).amax(-1)  # [U, B]
        index = torch.arange(first, first + acts.shape[0]).expand_as(peak)
        self.max = peak.amax(1) if self.max is None else torch.maximum(self.max, peak.amax(1))
        if self.index is not None:
            batch, peak, index = (
                torch.cat(p, 1) for p in ((self.acts, batch), (self.peak, peak), (self.index, index))
            )
        # Equal peaks are common (excerpts share the chat template's opening), equal up to the rounding of the
        # batch they ran in. Ranked at the precision the activations are stored in, with a stable sort that keeps
        # the lowest excerpt index first among equals (kept ones precede the batch, in index order), the record is
        # the same whatever the batch size; topk on the raw peaks broke such ties by the batch's rounding.
        keep = peak.to(STORED).sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.index, self.peak = index.gather(1, keep), peak.gather(1, keep)
        self.acts = batch.gather(1, keep[:, :, None].expand(-1, -1, width))


@dataclass
class Recording:
    """Per unit family: `{family}.top_index` [U, k], `.top_acts` [U, k, T], `.random_acts` [U, r, T], `.max` [U]."""

    tensors: dict[str, torch.Tensor]
    tokens: list[list[str]]  # the excerpts as token strings
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return [k[: -len(".max")] for k in self.tensors if k.endswith(".max")]

    def units(self, family: str) -> int:
        return self.tensors[f"{family}.max"].shape[0]

    def excerpts(self, unit: str) -> tuple[list[Excerpt], list[Excerpt]]:
        """(top, random) excerpts of a unit, e.g. `L2.N17` or `L0.H3`."""
        family, u = unit_key(unit)
        if family not in self.families or u >= self.units(family):
            raise InspectError(f"unit {unit} is not in the recording (families: {', '.join(self.families)})")
        top = self.tensors[f"{family}.top_index"][u].tolist()
        rand = self.tensors["random_index"].tolist()

        def excerpts(indices: list[int], acts: torch.Tensor) -> list[Excerpt]:
            # Stored activations are padded to the longest excerpt; each excerpt keeps its own length.
            return [
                Excerpt(self.tokens[i], a[: len(self.tokens[i])].float().tolist())
                for i, a in zip(indices, acts, strict=True)
            ]

        return (
            excerpts(top, self.tensors[f"{family}.top_acts"][u]),
            excerpts(rand, self.tensors[f"{family}.random_acts"][u]),
        )

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(out / ACTIVATIONS_FILE))
        (out / RECORD_FILE).write_text(json.dumps({**self.meta, "tokens": self.tokens}))

    @classmethod
    def load(cls, out_dir: str | Path) -> Recording:
        from safetensors.torch import load_file

        out = Path(out_dir)
        if not (out / ACTIVATIONS_FILE).is_file() or not (out / RECORD_FILE).is_file():
            raise InspectError(
                f"{out_dir}: not a neuron recording (run `rlhf inspect neurons --out {out_dir}`)"
            )
        meta = json.loads((out / RECORD_FILE).read_text())
        return cls(load_file(str(out / ACTIVATIONS_FILE)), meta.pop("tokens"), meta)


def progress(total: int, desc: str, unit: str = "excerpt"):
    """A progress bar on stderr, shown only on a terminal so logs stay clean."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty())


def record(
    model,
    tokenizer,
    excerpts: list[list[int]],
    top_k: int = 20,
    n_random: int = 20,
    heads: bool = False,
    batch_size: int = 16,
    seed: int = 0,
) -> Recording:
    """Run every excerpt through the model once, keeping each unit's top-k excerpts and a shared random set."""
    parts = locate(model)
    width = max(len(e) for e in excerpts)
    random_index = sorted(random.Random(seed).sample(range(len(excerpts)), min(n_random, len(excerpts))))
    tops: dict[str, FamilyTop] = {}
    randoms: dict[str, torch.Tensor] = {}
    with progress(len(excerpts), "recording") as bar:
        for first in range(0, len(excerpts), batch_size):
            batch = excerpts[first : first + batch_size]
            lengths = torch.tensor([len(e) for e in batch])
            for family, acts in forward_units(model, parts, batch, tokenizer.pad_token_id, heads).items():
                tops.setdefault(family, FamilyTop(top_k)).update(acts, lengths, first, width)
                store = randoms.setdefault(family, torch.zeros(acts.shape[2], len(random_index), width))
                for slot, i in enumerate(random_index):
                    if first <= i < first + len(batch):
                        store[:, slot, : len(excerpts[i])] = acts[i - first, : len(excerpts[i])].T
            bar.update(len(batch))
    tensors: dict[str, torch.Tensor] = {"random_index": torch.tensor(random_index, dtype=torch.int32)}
    for family, top in tops.items():
        tensors[f"{family}.top_index"] = top.index.to(torch.int32)
        tensors[f"{family}.top_acts"] = top.acts.to(STORED)
        tensors[f"{family}.random_acts"] = randoms[family].to(STORED)
        tensors[f"{family}.max"] = top.max.float()
    meta = {"excerpts": len(excerpts), "top_k": top_k, "random": len(random_index), "excerpt_width": width}
    return Recording(tensors, token_strings(tokenizer, excerpts), meta)


def unit_card(
    recording: Recording, unit: str, explanation: str | None = None, score: float | None = None
) -> str:
    """A unit's explanation and score above its 3 top excerpts, shaded on the scale of its largest activation."""
    from rlhf.inspect import html

    top, _ = recording.excerpts(unit)
    scale = max((max(e.activations) for e in top if e.activations), default=0.0)
    return html.unit_card(unit, explanation, score, [(e.tokens, e.activations) for e in top[:3]], scale)


# --------------------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Causal-LM checkpoint directory.")
    parser.add_argument(
        "--data", required=True, nargs="+", help="Text or conversation files (JSONL, JSON, ...)."
    )
    parser.add_argument("--out", default="outputs/inspect/neurons", help="Output directory.")
    parser.add_argument(
        "--top-k", type=at_least(1), default=20, help="Top-activating excerpts kept per unit."
    )
    parser.add_argument(
        "--random", type=at_least(0), default=20, help="Random excerpts kept (shared by all units)."
    )
    parser.add_argument("--excerpt-tokens", type=at_least(1), default=64, help="Excerpt length in tokens.")
    parser.add_argument("--heads", action="store_true", help="Record attention heads as units too.")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random excerpt sample.")


def record_files(model_path: str, data: list[str], args: argparse.Namespace) -> Recording:
    """Read the data (errors before any model loads), load the model, record: what `neurons` and `diff` share."""
    from rlhf.inspect import check_causal_lm, load_model

    documents = read_documents(data)
    check_causal_lm(model_path)
    model, tokenizer = load_model(model_path)
    excerpts = make_excerpts(tokenizer, [render(tokenizer, d) for d in documents], args.excerpt_tokens)
    recording = record(
        model, tokenizer, excerpts, args.top_k, args.random, args.heads, args.batch_size, args.seed
    )
    recording.meta.update(model=model_path, data=list(data))
    return recording


def run(args: argparse.Namespace) -> int:
    from rlhf.inspect import html

    recording = record_files(args.model, args.data, args)
    recording.save(args.out)
    sections = [
        html.paragraph(f"{args.model} on {' '.join(args.data)}: {recording.meta['excerpts']} excerpts.")
    ]
    for family in recording.families:
        peaks = recording.tensors[f"{family}.max"]
        sections.append(html.heading(f"{family}: the 5 units with the largest activation"))
        sections += [
            unit_card(recording, unit_name(family, u)) for u in peaks.argsort(descending=True)[:5].tolist()
        ]
    html.write_page(Path(args.out) / "neurons.html", "Neuron activations", sections)
    units = sum(recording.units(f) for f in recording.families)
    print(f"recorded {units} units over {recording.meta['excerpts']} excerpts -> {args.out}")
    return 0
