"""TRL 1.12's `trl.experimental.ppo.PPOTrainer` on the benchmark configuration; run by compare_trl.py.

Runs in benchmarks/.venv-trl112 (trl==1.12.0), so it must not import `rlhf`: the models, tokenizer and prompt
token ids come from the directories and files `common.prepare()` wrote. Writes one JSON object to --out:
per-update seconds (from a callback at each update's end), generation seconds (by wrapping TRL's
`batch_generation`), generated tokens and peak memory.

    benchmarks/.venv-trl112/bin/python benchmarks/trl_worker.py --policy P --reward R --prompt-ids F --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="Policy (and reference, value backbone) directory.")
    parser.add_argument("--reward", required=True, help="Reward model directory (sequence classifier).")
    parser.add_argument("--prompt-ids", required=True, help="JSON list of prompt token-id lists.")
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop_token='eos'; default None: always response_length tokens.",
    )
    parser.add_argument("--micro-batch", type=int, default=0, help="Samples per forward/backward; 0 = all.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--adam-eps", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=2, help="Updates run before timing.")
    parser.add_argument("--updates", type=int, default=5, help="Quiet timed updates wanted.")
    parser.add_argument("--max-updates", type=int, default=20, help="Timed updates at most.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="TRL's default; off to match ours."
    )
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from common import busy_and_own, quiet_threshold  # torch-only helpers shared with our side
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    ids = json.loads(open(args.prompt_ids).read())
    prompts = len(ids)
    micro = args.micro_batch or prompts
    total_updates = args.warmup + args.max_updates

    # Time generation inside TRL's loop, and check it really samples response_length tokens.
    generate_seconds: list[float] = []
    generated_shapes: list[list[int]] = []
    generated_lengths: list[
        list[int]
    ] = []  # per update: each answer's length up to and including its first EOS
    real_batch_generation = ppo_module.batch_generation

    def timed_batch_generation(model, queries, *rest, **kwargs):
        sync(args.device)
        start = time.perf_counter()
        query_responses, logits = real_batch_generation(model, queries, *rest, **kwargs)
        sync(args.device)
        generate_seconds.append(time.perf_counter() - start)
        generated_shapes.append([queries.shape[0], query_responses.shape[1] - queries.shape[1]])
        generated_lengths.append(answer_lengths(query_responses[:, queries.shape[1] :], eos_token_id))
        return query_responses, logits

    ppo_module.batch_generation = timed_batch_generation

    intervals: list[dict] = []  # one per update: wall and CPU seconds, cores other processes used meanwhile

    class EnoughUpdates(Exception):
        """Raised from the callback: TRL's PPO loop ignores `control.should_training_stop`."""

    class UpdateClock(TrainerCallback):
        def mark(self):
            sync(args.device)
            self.wall, self.cpu, (self.busy, self.own) = (
                time.perf_counter(),
                time.process_time(),
                busy_and_own(),
            )

        def on_train_begin(self, *_, **__):
            self.mark()

        def on_step_end(self, *_, **__):
            wall, cpu, busy, own = self.wall, self.cpu, self.busy, self.own
            self.mark()
            seconds = self.wall - wall
            others = round(max(0.0, (self.busy - busy) - (self.own - own)) / seconds, 2)
            quiet = others < quiet_threshold(args.threads)
            intervals.append({"update": seconds, "cpu": self.cpu - cpu, "others": others, "quiet": quiet})
            if sum(i["quiet"] for i in intervals[args.warmup :]) >= args.updates:
                raise EnoughUpdates

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"  # generation needs left-padded queries
    eos_token_id = tokenizer.eos_token_id if args.stop_at_eos else None
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    torch.manual_seed(args.seed)
    value = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=dtype)
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id

    output_dir = tempfile.mkdtemp(prefix="trl-ppo-bench-")
    config = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=micro,  # minibatch = rollout (1 minibatch), accumulated over micro-batches
        gradient_accumulation_steps=prompts // micro,
        num_mini_batches=1,
        num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=prompts,  # one generate call for all prompts, as ours
        response_length=args.response_length,
        # None: always sample response_length tokens (ours: always_full_length); "eos": generation stops when
        # every answer has ended, answers are cut after their first EOS.
        stop_token="eos" if args.stop_at_eos else None,
        temperature=args.temperature,
        total_episodes=prompts * total_updates,
        num_sample_generations=0,
        learning_rate=args.learning_rate,
        adam_epsilon=args.adam_eps,
        weight_decay=0.0,  # TRL's config default is 0.01; ours uses 0
        kl_coef=args.kl_coef,
        missing_eos_penalty=1.0,
        bf16=args.device == "cuda",  # autocast over float32 weights, as ours with mixed_precision bf16
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        value_model=value,
        callbacks=[UpdateClock()],
    )
    try:
        trainer.train()
    except EnoughUpdates:
        pass

    records = []
    timed = list(zip(intervals, generate_seconds, generated_lengths, strict=False))[args.warmup :]
    for interval, gen, lengths in timed:
        tokens = sum(lengths)  # real answer tokens (with stop_token None: all sampled tokens, as before)
        records.append(
            {
                **interval,
                "generate": gen,
                "tokens": tokens,
                "tokens_per_second": tokens / interval["update"],
                "generate_tokens_per_second": tokens / gen,
                "mean_length": tokens / len(lengths),
                "lengths": lengths,
            }
        )
    quiet = [r for r in records if r["quiet"]] or records
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device == "cuda":
        memory["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result = {
        "impl": "trl",
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
        },
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,
        "optimizer_defaults": {
            k: v
            for k, v in trainer.optimizer.defaults.items()
            if isinstance(v, (int, float, bool, str, type(None)))
        },
        "generated_shapes": generated_shapes,
        "median": {
            k: statistics.median(r[k] for r in quiet)
            for k in records[0]
            if k != "quiet" and isinstance(records[0][k], (int, float))
        },
        "quiet_updates": sum(r["quiet"] for r in records),
        "timed_updates": len(records),
        "per_update": records,
        **memory,
        "threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


def answer_lengths(responses, eos_token_id: int | None) -> list[int]:
    """Tokens of each answer up to and including its first EOS (all of them without EOS or stop token)."""
    width = responses.shape[1]
    if eos_token_id is None:
        return [width] * responses.shape[0]
    is_eos = responses == eos_token_id
    first = is_eos.int().argmax(dim=1)
    return [int(f) + 1 if e else width for f, e in zip(first, is_eos.any(dim=1), strict=True)]


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main(sys.argv[1:])
