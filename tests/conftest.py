"""Shared fixtures: a tiny model built locally once per session, loaded back through from_pretrained."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this one's as it is now (a test's `monkeypatch.setenv` included),
    offline, with tests/ importable (stand-in models and probes live there), plus `extra`."""
    tests_path = f"{REPO / 'tests'}{os.pathsep}{REPO}"
    return {**os.environ, "PYTHONPATH": tests_path, "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m rlhf.cli ARGS` from the repository root, as a user runs it; `env` adds to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(env),
        timeout=timeout,
    )


def launch_two_processes(module: str, argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`accelerate launch` of a stage module in 2 CPU processes (torchrun, gloo), with tests/ importable."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/ddp_cpu.yaml"),
        "-m",
        module,
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=timeout)


# The first DeepSpeed launch on a machine JIT-compiles its CPU shared-memory collectives (~3 min on 2 cores; cached
# in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR afterwards), hence the margin.
PROBE_LAUNCH_TIMEOUT_S = 600


def launch_probe(
    accelerate_config: Path, probe_dir: Path, stage: str, args: dict, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/distributed_probe.py for `stage` with `--key value` args; each rank writes what it
    saw to `probe_dir`. One thread per rank, so two ranks on a 2-core machine do not fight over the cores."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "tests/distributed_probe.py",
        str(probe_dir),
        stage,
        *[item for key, value in args.items() for item in (f"--{key}", str(value))],
    ]
    env = child_env({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=PROBE_LAUNCH_TIMEOUT_S
    )


def forbid_calls(monkeypatch, module, *names: str) -> None:
    """`module.name(...)` fails the test: what runs first (input validation) must stop before it (a model load)."""
    for name in names:
        monkeypatch.setattr(
            module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} called before validation")
        )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def arithmetic_dialogues(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
                ]
            }
        )
    return rows


def make_tiny_model(root: Path) -> str:
    """The tests' tiny decoder and its tokenizer, trained on arithmetic dialogues, saved in `root/model`."""
    from rlhf.models import TinySize, init_tiny

    corpus = write_jsonl(root / "corpus.jsonl", arithmetic_dialogues(200))
    size = TinySize(hidden_size=64, layers=2, heads=2, intermediate_size=128, vocab_size=400)
    return init_tiny(str(root / "model"), size, [str(corpus)])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rlhf.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
