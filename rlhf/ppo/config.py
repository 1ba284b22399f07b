"""The PPO stage's config: one dataclass, read from YAML with command-line overrides (`rlhf.config`).

Batch sizes, per process: `rollout_batch_size` prompts per update; `mini_batch_size` samples per optimizer step;
`micro_batch_size` samples per forward/backward. Gradient accumulation = mini / micro, derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, check_field_types, check_values, one_of
from rlhf.models import DTYPES, check_adapter_start
from rlhf.rollout import check_sampling

# Values the stage cannot run with, or would run wrongly with (a negative clip, a discount above 1...).
VALUE_RULES = {
    **dict.fromkeys(
        (
            "rollout_batch_size",
            "mini_batch_size",
            "micro_batch_size",
            "total_updates",
            "ppo_epochs",
            "save_every",
            "log_every",
            "sample_every",
            "max_prompt_length",
            "max_nonfinite_steps",
            "lora_r",
            "lora_alpha",
            "learning_rate",
            "adam_eps",
            "max_grad_norm",
            "kl_horizon",
            "cliprange",
            "cliprange_value",
        ),
        POSITIVE,
    ),
    # 0 switches these off, as None does: target_kl (fixed beta), approx_kl_stop, reward_clip.
    **dict.fromkeys(
        (
            "weight_decay",
            "kl_coef",
            "vf_coef",
            "entropy_coef",
            "ptx_coef",
            "target_kl",
            "approx_kl_stop",
            "reward_clip",
        ),
        NON_NEGATIVE,
    ),
    "gamma": FRACTION,
    "lam": FRACTION,
    "ema_decay": (lambda x: 0 < x < 1, "in (0, 1)"),
    "dtype": one_of(*DTYPES),
    "mixed_precision": one_of("no", "bf16", "fp16"),
}


@dataclass
class PPOStageConfig:
    """PPO stage. Defaults follow the N+ implementation details (TL;DR) unless noted."""

    # models
    policy_model: str = field(
        default="", metadata={"help": "SFT checkpoint: the policy's start and the reference."}
    )
    reference_model: str = field(
        default="", metadata={"help": "Frozen reference; empty = policy_model (or the LoRA base)."}
    )
    reward_model: str = field(
        default="", metadata={"help": "Reward-stage output; empty = no learned reward model."}
    )
    value_init: str = field(
        default="reward", metadata={"help": "Value model start: 'reward' (the RM) or 'policy' (fresh head)."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    use_lora: bool = field(
        default=False, metadata={"help": "LoRA policy; the reference is the base with the adapter off."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    merge_lora: bool = field(
        default=True, metadata={"help": "Save the final LoRA policy merged into its base."}
    )
    # data and output
    train_data: list[str] = field(
        default_factory=list, metadata={"help": "Prompt files (prompt/messages, category)."}
    )
    output_dir: str = field(
        default="outputs/ppo", metadata={"help": "Where checkpoints and the final policy go."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this (tokens) are dropped, counted."}
    )
    # rewards
    reward_sources: list[str] = field(
        default_factory=lambda: ["reward_model"],
        metadata={
            "help": "'reward_model', 'safety', or 'module:function' callables (prompts, completions) -> scores."
        },
    )
    reward_weights: list[float] = field(
        default_factory=lambda: [1.0], metadata={"help": "One weight per source."}
    )
    safety_config: str = field(
        default="configs/safety/rules.yaml", metadata={"help": "Safety reward config (YAML)."}
    )
    reward_allowed_modules: list[str] = field(
        default_factory=lambda: ["rlhf."],
        metadata={"help": "Import prefixes a 'module:function' source may come from."},
    )
    reward_clip: float | None = field(default=None, metadata={"help": "Clip normalised RM scores to +-this."})
    missing_eos_penalty: float | None = field(
        default=-1.0, metadata={"help": "Score for answers without EOS (None = off)."}
    )
    missing_eos_mode: str = field(
        default="replace",
        metadata={"help": "'replace' the score (default, N+ details) or 'subtract' the penalty's magnitude."},
    )
    # sampling
    max_new_tokens: int = field(default=48, metadata={"help": "Response length limit."})
    always_full_length: bool = field(
        default=False, metadata={"help": "Sample max_new_tokens always (then cut at EOS)."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; logits are divided by it in every pass."}
    )
    top_k: int = field(default=0, metadata={"help": "0 = off: keeps the sampled distribution the policy's."})
    top_p: float = field(default=1.0, metadata={"help": "1.0 = off."})
    # batch sizes (per process)
    rollout_batch_size: int = field(default=16, metadata={"help": "Prompts per PPO update."})
    mini_batch_size: int = field(default=16, metadata={"help": "Samples per optimizer step."})
    micro_batch_size: int = field(default=8, metadata={"help": "Samples per forward/backward."})
    # algorithm
    total_updates: int = field(default=100, metadata={"help": "PPO updates (rollout + epochs) to run."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    learning_rate: float = field(
        default=3e-6, metadata={"help": "AdamW learning rate, linearly annealed to 0."}
    )
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "beta: per-token KL penalty coefficient (initial, if adaptive)."}
    )
    kl_estimator: str = field(
        default="k1", metadata={"help": "KL estimator in the reward: k1 (default) or k3."}
    )
    target_kl: float | None = field(
        default=None, metadata={"help": "Adaptive beta target (Ziegler et al.); None = fixed."}
    )
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive beta horizon (samples)."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages per rollout."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    approx_kl_stop: float | None = field(
        default=None, metadata={"help": "Stop an update's epochs when approx KL exceeds this."}
    )
    ptx_coef: float = field(
        default=0.0, metadata={"help": "PPO-ptx: weight of the SFT loss on demonstrations."}
    )
    ptx_data: list[str] = field(default_factory=list, metadata={"help": "Demonstrations for PPO-ptx."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA of the policy (e.g. 0.992); saved to ema/."}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Abort after this many non-finite losses in a row."}
    )
    # operations
    seed: int = field(
        default=0, metadata={"help": "Seed: data order (shared by ranks) and sampling (offset by rank)."}
    )
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N updates (and at the end)."})
    keep_last: int = field(default=2, metadata={"help": "Committed checkpoints to keep."})
    log_every: int = field(default=1, metadata={"help": "Log metrics every N updates."})
    sample_every: int = field(
        default=10, metadata={"help": "Write a table of sample completions every N updates."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Trackers: tensorboard, wandb, none."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'auto', a checkpoint path, or None."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    mixed_precision: str = field(
        default="no", metadata={"help": "accelerate mixed precision: no, bf16, fp16."}
    )

    def __post_init__(self):
        if isinstance(
            self.resume_from_checkpoint, bool
        ):  # YAML true/false: resume_from_checkpoint reads both
            self.resume_from_checkpoint = "auto" if self.resume_from_checkpoint else None
        check_field_types(self)
        check_values(self, VALUE_RULES)
        if not self.policy_model:
            raise ConfigError("policy_model: required")
        check_adapter_start("policy_model", self.policy_model, self.use_lora, self.merge_lora)
        if not self.train_data:
            raise ConfigError("train_data: at least one prompt source is required")
        if len(self.reward_weights) != len(self.reward_sources):
            raise ConfigError(
                f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_sources)} reward_sources"
            )
        if "reward_model" in self.reward_sources and not self.reward_model:
            raise ConfigError("reward_model: required when reward_sources includes 'reward_model'")
        if self.rollout_batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                "batch sizes: rollout_batch_size must be a multiple of mini_batch_size, and that of micro_batch_size"
            )
        for name, allowed in (
            ("kl_estimator", ("k1", "k3")),
            ("value_init", ("reward", "policy")),
            ("missing_eos_mode", ("replace", "subtract")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: expected one of {allowed}, found {getattr(self, name)!r}")
        if self.value_init == "reward" and not self.reward_model:
            self.value_init = "policy"
        check_sampling(self)
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_data: required when ptx_coef > 0")
        self.reference_model = self.reference_model or ("" if self.use_lora else self.policy_model)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size
