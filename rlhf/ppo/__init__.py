"""Stage 3: PPO against the reward sources, with a per-token KL penalty to the frozen SFT reference.

    accelerate launch -m rlhf.ppo --config configs/demo/ppo.yaml

Our own loop on accelerate (TRL no longer ships PPO), following InstructGPT and "The N+ Implementation Details
of RLHF with PPO" (Huang et al., 2024). `update.py` holds one update as numbered steps (generate, score,
log-probs, KL-penalised rewards, advantages, PPO epochs); `config.py` the stage's config; `stage.py` the set-up,
the loop and the final save; `checkpoint.py` what a checkpoint holds. The math is in `rlhf.losses`, the forward
passes in `rlhf.rollout`.
"""

from rlhf.ppo.checkpoint import load_checkpoint, save_checkpoint
from rlhf.ppo.config import PPOStageConfig
from rlhf.ppo.stage import build_run, cli, main, run_update
from rlhf.ppo.update import PPORun, TrainingAborted

__all__ = [
    "PPORun",
    "PPOStageConfig",
    "TrainingAborted",
    "build_run",
    "cli",
    "load_checkpoint",
    "main",
    "run_update",
    "save_checkpoint",
]
