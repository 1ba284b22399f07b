"""rlhf: supervised fine-tuning -> reward model -> PPO on the Hugging Face stack."""

__version__ = "0.1.0"
