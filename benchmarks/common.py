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

The realistic configuration (`REALISTIC`) lets answers end at EOS: 16 prompts, answers of up to 256 tokens whose
lengths vary (the policy ends an answer at each step with probability 1/64, so lengths are geometric, mean about
64), micro-batches of 4 (4 accumulated per optimizer step). Its policy is the same tiny Llama with one hidden
dimension turned into a constant channel that feeds the EOS logit (`write_eos_policy`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results"
PROMPT_SOURCE = REPO / "data" / "demo" / "prompts.jsonl"
EOS_CHANNEL = 4.0  # write_eos_policy: the constant hidden value; ~20x the other dimensions' typical size
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
    reward: str = "function"  # "function": rlhf.demo:gold_judge; "model": a same-size classifier
    threads: int = 2
    seed: int = 0
    device: str = "cpu"  # "cpu" (float32) or "cuda" (bf16 autocast over float32 weights, SDPA)
    micro_batch: int = 0  # samples per forward/backward; 0 = all prompts in one
    stop_at_eos: bool = False  # False: every answer runs response_length tokens (EOS sampled past, then cut)
    eos_probability: float = 0.0  # > 0: a policy that ends an answer at each step with this probability

    @property
    def micro(self) -> int:
        return self.micro_batch or self.prompts


# Answers end at EOS at varied lengths: the configuration of issue #16.
REALISTIC = Setup(
    prompts=16, response_length=256, micro_batch=4, stop_at_eos=True, eos_probability=1 / 64, reward="model"
)


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
    if setup.eos_probability > 0:
        base, policy = policy, root / f"policy-eos{setup.eos_probability:.4g}-t{setup.temperature:g}"
        if not (policy / "model.safetensors").exists():
            write_eos_policy(str(base), str(policy), setup.eos_probability, setup.temperature)
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


def write_eos_policy(base: str, out: str, eos_probability: float, temperature: float) -> None:
    """The base policy changed so that, at `temperature`, each sampled token is EOS with about `eos_probability`.

    A random tiny Llama almost never samples EOS, and a trained one ends where its data did; this gives a fixed,
    known length distribution instead (geometric). The last hidden dimension d becomes a constant channel: every
    token embedding holds CHANNEL there and no layer writes to it, so after the final RMSNorm it is about
    sqrt(hidden) * (1 - small) at every position. The embeddings are tied to the LM head, so every logit gets
    y_d * CHANNEL (a shift that softmax ignores) and EOS gets y_d * (CHANNEL + delta): delta sets the EOS odds.
    The large constant also shrinks the other normalised dimensions, so the other tokens come out nearly uniform.
    """
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    d, eos = model.config.hidden_size - 1, tokenizer.eos_token_id
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, d] = EOS_CHANNEL
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[d] = 0
            layer.mlp.down_proj.weight[d] = 0
        model.model.norm.weight[d] = 1.0
        # Pick delta by bisection so that the mean EOS probability over a sequence of random tokens (what this
        # near-uniform policy samples) is eos_probability.
        ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(0))
        low, high = 0.0, 5.0
        for _ in range(30):
            delta = (low + high) / 2
            embeddings[eos, d] = EOS_CHANNEL + delta
            logits = model(input_ids=ids, use_cache=False).logits[0] / temperature
            if torch.softmax(logits, -1)[:, eos].mean() < eos_probability:
                low = delta
            else:
                high = delta
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


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
        "mixed_precision": "bf16" if setup.device == "cuda" else "no",
        "max_new_tokens": setup.response_length,
        "always_full_length": str(not setup.stop_at_eos).lower(),
        "temperature": setup.temperature,
        "rollout_batch_size": setup.prompts,
        "mini_batch_size": setup.prompts,
        "micro_batch_size": setup.micro,
        "ppo_epochs": setup.ppo_epochs,
        "total_updates": updates,
        "learning_rate": setup.learning_rate,
        "adam_eps": setup.adam_eps,
        "kl_coef": setup.kl_coef,
        # TRL subtracts its missing_eos_penalty (1.0) from the score of an answer without EOS: the same here.
        "missing_eos_penalty": -1.0,
        "missing_eos_mode": "subtract",
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
        from rlhf.ppo import build_run

        os.makedirs(output_dir, exist_ok=True)
        self.setup = setup
        self.run = build_run(ours_config(setup, paths, output_dir, updates))

    def step(self) -> dict[str, float]:
        from rlhf.ppo import run_update

        sync(self.setup.device)
        start, cpu = time.perf_counter(), time.process_time()
        stats = run_update(self.run)
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
            "mean_length": stats["response/length"],
            "eos_rate": stats["response/eos_rate"],
        }


# --------------------------------------------------------------------------------------------------------------
# The bare-compute limit: the same work written directly in torch, nothing else


def autocast(device: str):
    """bf16 autocast on a GPU (float32 weights and optimizer, as accelerate's and TRL's bf16 do); off on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


class Limit:
    """The least any PPO implementation must compute per update, on the same models and inputs:

    one `generate` call with our sampling settings; no-grad forwards for the old log-probs, reference log-probs,
    values (and the reward model's score when the reward is a model); then `ppo_epochs` x (forward of policy and
    value, clipped PPO losses, backward, AdamW step), in micro-batches of `setup.micro` samples grouped by length.
    No accelerate, no stats, no GAE, no gradient clipping. The forward passes are ours (`rlhf.rollout`'s
    `policy_forward` and `value_forward`: only real tokens, packed where the model supports it, logits only where
    an answer token is predicted), since they are the least work a pass needs; what is left out is the loop.
    """

    def __init__(self, setup: Setup, paths: dict[str, str]):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from rlhf.models import load_tokenizer
        from rlhf.rollout import enable_packing, left_pad

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
        self.packed = all([enable_packing(m) for m in (self.policy, self.reference, self.value)])
        for model in (self.reference, self.reward):
            if model is not None:
                model.eval().requires_grad_(False)
        params = list(self.policy.parameters()) + list(self.value.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=setup.learning_rate, eps=setup.adam_eps)

    def _generate(self):
        from rlhf.rollout import Rollout, cut_after_eos

        setup, tok = self.setup, self.tokenizer
        self.policy.eval()
        with torch.no_grad(), autocast(setup.device):
            out = self.policy.generate(
                input_ids=self.query_ids,
                attention_mask=self.query_mask,
                max_new_tokens=setup.response_length,
                min_new_tokens=0 if setup.stop_at_eos else setup.response_length,
                do_sample=True,
                temperature=setup.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                use_cache=True,
            )
        responses = out[:, self.query_ids.shape[1] :]
        if setup.stop_at_eos:
            responses, mask, has_eos = cut_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        else:
            mask, has_eos = torch.ones_like(responses), torch.zeros(len(responses), dtype=torch.bool)
        return Rollout(self.query_ids, self.query_mask, responses, mask, has_eos)

    def _no_grad_passes(self, batch) -> list:
        """Old log-probs, reference log-probs, values and score; stand-ins for GAE. -> micro-batches by length."""
        from rlhf.rollout import layout, policy_forward, value_forward

        lengths = batch.response_mask.sum(1)
        micro = [batch.select(i) for i in lengths.argsort(stable=True).split(self.setup.micro)]
        with torch.no_grad(), autocast(self.setup.device):
            for mb in micro:
                mb.logprobs = policy_forward(self.policy, mb, self.setup.temperature)[0]
                mb.ref_logprobs = policy_forward(self.reference, mb, self.setup.temperature)[0]
                mb.values = value_forward(self.value, mb)
                if self.reward is not None:
                    mb.scores = self.reward(**layout(mb, packed=False).inputs, use_cache=False).logits[:, 0]
                else:
                    mb.scores = torch.zeros(len(mb.has_eos), device=mb.values.device)
                # Any advantages/returns of the right shape cost the same to train on.
                mb.advantages = mb.ref_logprobs - mb.logprobs + mb.scores.float().unsqueeze(1)
                mb.returns = mb.values + mb.advantages
        return micro

    def _train(self, micro: list) -> None:
        from rlhf.rollout import policy_forward, value_forward

        setup = self.setup
        tokens = sum(mb.response_mask.sum() for mb in micro)
        self.policy.train()
        self.value.train()
        for _ in range(setup.ppo_epochs):
            for mb in micro:
                mask = mb.response_mask.bool()
                with autocast(setup.device):
                    logprobs = policy_forward(self.policy, mb, setup.temperature)[0]
                    values = value_forward(self.value, mb)
                ratio = torch.exp(logprobs - mb.logprobs)
                pg = torch.max(-mb.advantages * ratio, -mb.advantages * ratio.clamp(0.8, 1.2))
                vclipped = mb.values + (values - mb.values).clamp(-0.2, 0.2)
                vf = 0.5 * torch.max((values - mb.returns) ** 2, (vclipped - mb.returns) ** 2)
                ((pg[mask].sum() + 0.1 * vf[mask].sum()) / tokens).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        setup = self.setup
        sync(setup.device)
        t0, cpu = time.perf_counter(), time.process_time()
        batch = self._generate()
        sync(setup.device)
        t1 = time.perf_counter()
        micro = self._no_grad_passes(batch)
        sync(setup.device)
        t2 = time.perf_counter()
        self._train(micro)
        sync(setup.device)
        t3 = time.perf_counter()
        lengths = batch.response_mask.sum(1)
        tokens = float(lengths.sum())
        return {
            "update": t3 - t0,
            "cpu": time.process_time() - cpu,
            "generate": t1 - t0,
            "logprobs": t2 - t1,
            "train": t3 - t2,
            "tokens": tokens,
            "tokens_per_second": tokens / (t3 - t0),
            "generate_tokens_per_second": tokens / (t1 - t0),
            "mean_length": tokens / len(lengths),
            "eos_rate": float(batch.has_eos.float().mean()),
            "lengths": lengths.tolist(),
        }


def setup_dict(setup: Setup) -> dict[str, Any]:
    return asdict(setup)
