"""The `rlhf` command.

    rlhf data validate --kind {sft,pairs,prompts} PATH... [--tokenizer PATH]
    rlhf init-tiny OUTPUT_DIR [--hidden-size N --layers N --vocab-size N --corpus PATH...]
    rlhf sft --config FILE [--field value ...]
    rlhf reward --config FILE [...]          rlhf reward score --model PATH --data FILE [--out FILE]
    rlhf ppo --config FILE [...]
    rlhf safety classify --config FILE DATA
    rlhf pipeline --config FILE              rlhf eval ...              rlhf chat PATH
    rlhf inspect {neurons,explain,diff,...} ...   (see `rlhf inspect --help`)

Bad input ends with one line per problem and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rlhf.config import ConfigError, redact

EXIT_BAD_INPUT = 2


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (else argparse's usage error, exit 2, before any work)."""

    def count(text: str) -> int:
        value = int(text)  # not an integer: argparse reports "invalid count value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, found {value}")
        return value

    return count


def output_file(text: str) -> str:
    """An argparse type: a file to write the results to, checked now, not after the work whose results it was to
    hold. Missing directories are fine (made when it is written, below the nearest existing one, which must be a
    writable directory); a directory, or an existing file that cannot be written, is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} is not writable")
        return text
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    return text


def user_errors() -> tuple[type[BaseException], ...]:
    from rlhf.checkpoint import HandoffError, ResumeError
    from rlhf.data import DataError
    from rlhf.inspect import InspectError
    from rlhf.models import ModelLoadError

    return (DataError, ConfigError, HandoffError, ResumeError, ModelLoadError, InspectError)


def run_guarded(action: Callable[[], object]) -> int:
    """Run a command; bad input (data, config, hand-off, resume) prints its message and returns exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        action()
    except ConfigError as err:
        print(redact(f"error: config: {err}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except user_errors() as err:
        print(redact(f"error: {err}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        leave_process_group()
    return 0


def leave_process_group() -> None:
    """Shut down a multi-process launch's process group (and its communication threads) while the interpreter is
    still whole, rather than leaving it to be destroyed at exit. A no-op in one process."""
    dist = sys.modules.get("torch.distributed")  # never imported by commands that do not need it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a command run as a script with `code`.

    In a multi-process launch (WORLD_SIZE > 1) everything the interpreter does at exit runs (other threads joined,
    `atexit` handlers: loggers, trackers, temporary files) and the process then ends without destroying the
    remaining C++ objects. Under DeepSpeed ZeRO-3 on CPU that destruction has, rarely, aborted a rank after the run
    had finished and saved ("terminate called without an active exception"); the launcher then fails the whole
    finished job. Nothing is left to write by then: the command has returned, and a stage that succeeded has
    committed its outputs after every rank passed its final barrier.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    # The interpreter's own exit sequence, up to the object teardown: stop and join threads, then atexit.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def data_validate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf data validate", description="Check data files before training."
    )
    parser.add_argument("--kind", required=True, choices=["sft", "pairs", "prompts"])
    parser.add_argument("--tokenizer", help="Tokenizer path: adds length percentiles in tokens.")
    parser.add_argument(
        "--max_length",
        type=int,
        help="With --kind pairs and --tokenizer: count the pairs the reward stage would cut to this many tokens, "
        "and those where even the last user turn and the answer do not fit (the request itself is cut).",
    )
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if args.max_length is not None and (args.kind != "pairs" or not args.tokenizer):
        parser.error("--max_length needs --kind pairs and --tokenizer")

    def action() -> None:
        from rlhf.data import LOADERS, summarise

        rows, report = LOADERS[args.kind](args.paths)
        tokenizer = None
        if args.tokenizer:
            from rlhf.models import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        summary = summarise(args.kind, rows, tokenizer)
        if args.max_length is not None:
            from rlhf.rewards import encode_pair, overflows

            # The whole pair as the stage reads it, then only the last user turn and the answer (context_turns 1).
            summary["over_max_length"] = {"max_length": args.max_length} | {
                name: sum(overflows(encode_pair(tokenizer, r, turns), args.max_length) for r in rows)
                for name, turns in (("pairs", None), ("last_user_turn_and_answer", 1))
            }
        summary.update(report.counts())
        summary["dropped_rows"] = [str(p) for p in report.dropped_at]
        print(json.dumps(summary, indent=2))

    return run_guarded(action)


def init_tiny(argv: list[str]) -> int:
    from rlhf.models import TinySize

    defaults = TinySize()
    parser = argparse.ArgumentParser(
        prog="rlhf init-tiny", description="Write a tiny Llama model and tokenizer."
    )
    parser.add_argument("output_dir")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument(
        "--corpus", nargs="*", default=["data/demo"], help="Data files the tokenizer is trained on."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def action() -> None:
        from rlhf.models import count_parameters, init_tiny, load_causal_lm

        size = TinySize(args.hidden_size, args.layers, args.heads, args.intermediate_size, args.vocab_size)
        missing = [c for c in args.corpus if not os.path.exists(c)]
        if missing:  # else the tokenizer would quietly be trained on a placeholder sentence
            raise ConfigError(f"--corpus: no such file or directory: {', '.join(missing)}")
        init_tiny(args.output_dir, size, args.corpus, args.seed)
        params = count_parameters(load_causal_lm(args.output_dir))
        print(f"wrote {args.output_dir}: Llama, {params / 1e6:.2f}M parameters")

    return run_guarded(action)


# command -> (module, function taking argv): stage modules own their parsers.
COMMANDS = {
    "sft": ("rlhf.sft", "cli"),
    "reward": ("rlhf.reward_model", "cli"),
    "ppo": ("rlhf.ppo", "cli"),
    "safety": ("rlhf.safety", "cli"),
    "pipeline": ("rlhf.pipeline", "cli"),
    "eval": ("rlhf.evaluation", "cli"),
    "chat": ("rlhf.chat", "cli"),
    "inspect": ("rlhf.inspect.cli", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "data":
        if not rest or rest[0] != "validate":
            print("usage: rlhf data validate --kind {sft,pairs,prompts} PATH...", file=sys.stderr)
            return EXIT_BAD_INPUT
        return data_validate(rest[1:])
    if command == "init-tiny":
        return init_tiny(rest)
    if command not in COMMANDS:
        print(f"rlhf: unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module, function = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)


def entry() -> NoReturn:
    """The `rlhf` console script."""
    exit_process(main())


if __name__ == "__main__":
    entry()
