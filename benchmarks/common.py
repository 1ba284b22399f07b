"""The fixed tiny PPO benchmark: its models and prompts, our PPO update, and the bare-compute limit.

Runs in the project's virtualenv (imports `rlhf`). The TRL side lives in `trl_worker.py`, which runs in its own
virtualenv and must not import `rlhf`; what both sides share (weights, tokenizer, prompt token ids) is written to
`benchmarks/.cache/` by `prepare()` and read back from disk by each side.

One update of the configuration (defaults of `Setup`):
    8 prompts from data/demo/prompts.jsonl (the first 8, so every update sees the same prompts and lengths),
    48 response tokens always sampled (temperature 0.7, top-k/top-p off), 4 PPO epochs over 1 minibatch of 8
    (micro-batch 8, no accumulation), fp32, a 4-layer 256-wide Llama (vocab 1029) as policy, reference and value
    (value = the policy's backbone with a fresh scalar head), reward from the demo gold judge ("function") or
    from a same-size sequence classifier ("model").
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results"
PROMPT_SOURCE = REPO / "data" / "demo" / "prompts.jsonl"
QUIET_MARGIN = 0.2  # cores: what other processes may use beyond the cores our threads leave them


@dataclass
class Setup:
    """One benchmark configuration. The defaults are the fixed tiny configuration of docs/benchmarks.md."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 1024
    prompts: int = 8  # prompts per update = rollout = mini = micro batch size
    response_length: int = 48
    ppo_epochs: int = 4
    temperature: float = 0.7
    learning_rate: float = 3e-6
    adam_eps: float = 1e-5
    kl_coef: float = 0.05
    reward: str = (
        "function"  # "function": rlhf.demo:gold_judge; "model": a same-size classifier
    )
    threads: int = 2
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"


# --------------------------------------------------------------------------------------------------------------
# Shared inputs, built once and cached


def prepare(setup: Setup) -> dict[str, str]:
    """Write (once) the tiny policy, a same-size reward model and the prompt files; return their paths."""
    from rlhf.models import TinySize, init_tiny

    root = CACHE / f"llama-{setup.layers}x{setup.hidden_size}-v{setup.vocab_size}"
    policy, reward = root / "policy", root / "reward"
    if not (policy / "model.safetensors").exists():
        size = TinySize(
            hidden_size=setup.hidden_size,
            layers=setup.layers,
            heads=setup.heads,
            intermediate_size=setup.intermediate_size,
            vocab_size=setup.vocab_size,
        )
        init_tiny(str(policy), size, [str(REPO / "data" / "demo")], seed=0)
    if not (reward / "manifest.json").exists():
        _write_reward_model(str(policy), str(reward))
    prompts_file = CACHE / f"prompts-{setup.prompts}.jsonl"
    if not prompts_file.exists():
        lines = PROMPT_SOURCE.read_text().splitlines()[: setup.prompts]
        if len(lines) < setup.prompts:
            raise ValueError(f"{PROMPT_SOURCE}: only {len(lines)} prompts, {setup.prompts} asked for")
        prompts_file.write_text("\n".join(lines) + "\n")
    ids_file = CACHE / f"prompt-ids-{setup.prompts}.json"
    if not ids_file.exists():
        ids_file.write_text(json.dumps(prompt_ids(str(policy), str(prompts_file))))
    return {
        "policy": str(policy),
        "reward": str(reward),
        "prompts": str(prompts_file),
        "prompt_ids": str(ids_file),
    }


def _write_reward_model(policy: str, out: str) -> None:
    """The policy's backbone with a seeded scalar head, saved as a reward-stage output (manifest included)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.checkpoint import write_manifest
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(policy)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out, "reward", {}, {}, {}, tokenizer, extra={"normalization": {"mean": 0.0, "std": 1.0}})


def prompt_ids(policy: str, prompts_file: str) -> list[list[int]]:
    """Token ids of each prompt exactly as our PPO stage renders them (chat template + generation prompt)."""
    from rlhf.data import load_prompts, render_prompt
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(policy, padding_side="left")
    rows, _ = load_prompts([prompts_file])
    return [
        tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"] for r in rows
    ]


# --------------------------------------------------------------------------------------------------------------
# Measurement helpers


def peak_memory_mib(device: str) -> dict[str, float]:
    """Peak resident set of this process (ru_maxrss, KiB on Linux) and, on a GPU, torch's peak allocation."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the quiet updates (other processes idle meanwhile; all updates if none was), plus the raw list."""
    quiet = [r for r in records if r.get("quiet", True)]
    used = quiet or records
    keys = [k for k in (used[0] if used else {}) if isinstance(used[0][k], (int, float)) and k != "quiet"]
    return {
        "median": {k: round(median([r[k] for r in used]), 4) for k in keys},
        "quiet_updates": len(quiet),
        "timed_updates": len(records),
        "per_update": records,
    }


def quiet_threshold(threads: int) -> float:
    """Other processes may use the cores our threads leave free (plus a margin) without slowing us down."""
    return max(0, (os.cpu_count() or 1) - threads) + QUIET_MARGIN


def quiet_updates(step, wanted: int, max_updates: int, threads: int) -> list[dict[str, Any]]:
    """Run `step` until `wanted` of its updates ran while other processes stayed off our cores, or `max_updates`
    ran. Each record gets `others` (cores other processes used during it) and `quiet`.

    On a shared 2-core machine a busy neighbour makes torch's 2 worker threads wait on each other, which can
    slow an update ten-fold; such updates are kept in the record but left out of the medians.
    """
    threshold = quiet_threshold(threads)
    records: list[dict[str, Any]] = []
    while sum(r["quiet"] for r in records) < wanted and len(records) < max_updates:
        with OtherLoad() as others:
            record = step()
        records.append({**record, "others": others.cores, "quiet": others.cores < threshold})
    return records


def load_average() -> float:
    return os.getloadavg()[0]


def busy_and_own() -> tuple[float, float]:
    """CPU-seconds all cores spent busy (from /proc/stat), and those of this process and its waited-for children."""
    with open("/proc/stat") as handle:
        ticks = [int(x) for x in handle.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    return busy, own


class OtherLoad:
    """How many cores other processes kept busy while we measured: a check that the machine was quiet.

    with OtherLoad() as load: ...   then load.cores (0.0 = idle machine, 2.0 = both cores taken by others).
    """

    def __enter__(self):
        self.wall, (self.busy, self.own) = time.perf_counter(), busy_and_own()
        return self

    def __exit__(self, *exc):
        busy, own = busy_and_own()
        wall = max(time.perf_counter() - self.wall, 1e-9)
        self.cores = round(max(0.0, (busy - self.busy) - (own - self.own)) / wall, 2)


def wait_until_idle(timeout: float, threshold: float = 0.2, window: float = 3.0) -> float:
    """Block until other processes use under `threshold` cores over a `window`, or `timeout` s passed.

    Returns the last measured load of others (cores)."""
    deadline = time.monotonic() + timeout
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if load.cores < threshold or time.monotonic() > deadline:
            return load.cores


# --------------------------------------------------------------------------------------------------------------
# Our PPO


def ours_config(setup: Setup, paths: dict[str, str], output_dir: str, updates: int):
    from rlhf.config import parse_config
    from rlhf.ppo import PPOStageConfig

    args = {
        "policy_model": paths["policy"],
        "train_data": paths["prompts"],
        "output_dir": output_dir,
        "value_init": "policy",
        "dtype": "float32",
        "max_new_tokens": setup.response_length,
        "always_full_length": "true",
        "temperature": setup.temperature,
        "rollout_batch_size": setup.prompts,
        "mini_batch_size": setup.prompts,
        "micro_batch_size": setup.prompts,
        "ppo_epochs": setup.ppo_epochs,
        "total_updates": updates,
        "learning_rate": setup.learning_rate,
        "adam_eps": setup.adam_eps,
        "kl_coef": setup.kl_coef,
        "save_every": updates + 1,
        "sample_every": updates + 1,
        "report_to": "none",
        "use_cpu": str(setup.device == "cpu").lower(),
        "seed": setup.seed,
    }
    if setup.reward == "model":
        args.update(reward_sources="reward_model", reward_weights="1.0", reward_model=paths["reward"])
    else:
        args.update(
            reward_sources="rlhf.demo:gold_judge", reward_weights="1.0", reward_allowed_modules="rlhf."
        )
    argv = [item for key, value in args.items() for item in (f"--{key}", str(value))]
    return parse_config(PPOStageConfig, argv)


class Ours:
    """Our PPO stage, built as `rlhf.ppo.main` builds it; `step()` runs one `run_update`."""

    def __init__(self, setup: Setup, paths: dict[str, str], output_dir: str, updates: int):
        from rlhf.ppo import build_trainer

        os.makedirs(output_dir, exist_ok=True)
        self.setup = setup
        self.trainer = build_trainer(ours_config(setup, paths, output_dir, updates))

    def step(self) -> dict[str, float]:
        from rlhf.ppo import run_update

        sync(self.setup.device)
        start, cpu = time.perf_counter(), time.process_time()
        stats = run_update(self.trainer)
        sync(self.setup.device)
        seconds = time.perf_counter() - start
        tokens = stats["response/length"] * self.setup.prompts
        return {
            "update": seconds,
            "cpu": time.process_time() - cpu,
            **{k: stats[f"time/{k}"] for k in ("generate", "score", "logprobs", "train")},
            "tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "generate_tokens_per_second": tokens / stats["time/generate"],
        }


# --------------------------------------------------------------------------------------------------------------
# The bare-compute limit: the same work written directly in torch, nothing else


class Limit:
    """The least any PPO implementation must compute per update, on the same models and inputs:

    one `generate` call with our sampling settings; no-grad forwards for the old log-probs, reference log-probs,
    values (and the reward model's score when the reward is a model); then `ppo_epochs` x (forward of policy and
    value, clipped PPO losses, backward, AdamW step). No accelerate, no stats, no copies, no EOS handling.
    """

    def __init__(self, setup: Setup, paths: dict[str, str]):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from rlhf.models import load_tokenizer
        from rlhf.rollout import left_pad

        self.setup, device = setup, setup.device
        self.tokenizer = load_tokenizer(paths["policy"], padding_side="left")
        ids = json.loads(Path(paths["prompt_ids"]).read_text())
        self.query_ids, self.query_mask = (t.to(device) for t in left_pad(ids, self.tokenizer.pad_token_id))
        self.policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).to(device)
        self.reference = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).to(device)
        torch.manual_seed(setup.seed)
        self.value = AutoModelForSequenceClassification.from_pretrained(
            paths["policy"], num_labels=1, dtype=torch.float32
        ).to(device)
        self.reward = (
            AutoModelForSequenceClassification.from_pretrained(paths["reward"], dtype=torch.float32).to(
                device
            )
            if setup.reward == "model"
            else None
        )
        for model in (self.reference, self.reward):
            if model is not None:
                model.eval().requires_grad_(False)
        params = list(self.policy.parameters()) + list(self.value.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=setup.learning_rate, eps=setup.adam_eps)

    def _logprobs(self, model, ids, mask, pos, responses):
        start = self.query_ids.shape[1] - 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, start:-1]
        logits = logits / self.setup.temperature
        return torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)

    def _values(self, ids, mask, pos):
        start = self.query_ids.shape[1] - 1
        hidden = self.value.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return self.value.score(hidden[:, start:-1]).squeeze(-1)

    def step(self) -> dict[str, float]:
        setup, tok = self.setup, self.tokenizer
        sync(setup.device)
        t0, cpu = time.perf_counter(), time.process_time()
        self.policy.eval()
        with torch.no_grad():
            out = self.policy.generate(
                input_ids=self.query_ids,
                attention_mask=self.query_mask,
                max_new_tokens=setup.response_length,
                min_new_tokens=setup.response_length,
                do_sample=True,
                temperature=setup.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                use_cache=True,
            )
        responses = out[:, self.query_ids.shape[1] :]
        sync(setup.device)
        t1 = time.perf_counter()
        mask = torch.cat([self.query_mask, torch.ones_like(responses)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            old_logprobs = self._logprobs(self.policy, out, mask, pos, responses)
            ref_logprobs = self._logprobs(self.reference, out, mask, pos, responses)
            old_values = self._values(out, mask, pos)
            if self.reward is not None:
                score = self.reward(input_ids=out, attention_mask=mask, position_ids=pos).logits[:, 0]
            else:
                score = torch.zeros(len(out), device=out.device)
            # Stand-ins for GAE: any advantages/returns of the right shape cost the same to train on.
            advantages = ref_logprobs - old_logprobs + score.unsqueeze(1)
            returns = old_values + advantages
        sync(setup.device)
        t2 = time.perf_counter()
        self.policy.train()
        self.value.train()
        for _ in range(setup.ppo_epochs):
            logprobs = self._logprobs(self.policy, out, mask, pos, responses)
            values = self._values(out, mask, pos)
            ratio = torch.exp(logprobs - old_logprobs)
            pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
            vclipped = old_values + (values - old_values).clamp(-0.2, 0.2)
            vf_loss = 0.5 * torch.max((values - returns) ** 2, (vclipped - returns) ** 2).mean()
            (pg_loss + 0.1 * vf_loss).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync(setup.device)
        t3 = time.perf_counter()
        tokens = float(responses.numel())
        return {
            "update": t3 - t0,
            "cpu": time.process_time() - cpu,
            "generate": t1 - t0,
            "logprobs": t2 - t1,
            "train": t3 - t2,
            "tokens": tokens,
            "tokens_per_second": tokens / (t3 - t0),
            "generate_tokens_per_second": tokens / (t1 - t0),
        }


def setup_dict(setup: Setup) -> dict[str, Any]:
    return asdict(setup)
