"""The `rlhf inspect` dispatcher.

    rlhf inspect neurons --model CKPT --data FILE [--out DIR]
    rlhf inspect explain --neurons DIR [--explainer offline|llm --explainer-model CKPT]
    rlhf inspect diff --before SFT_CKPT --after PPO_CKPT --prompts FILE [--out DIR]

Each subcommand is a module of `rlhf.inspect` exposing `add_arguments(parser)` and `run(args) -> int`; adding one
is adding its name to `SUBCOMMANDS`. Bad input ends with one line and exit code 2 (`rlhf.cli.run_guarded`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under rlhf.inspect; the command name is the module name with '-' for '_'.
SUBCOMMANDS = ["neurons", "explain", "diff", "logit_diff", "reward"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf inspect", description="What did RLHF change inside the model?"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"rlhf.inspect.{name}")
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = commands.add_parser(
            name.replace("_", "-"),
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlhf.cli import EXIT_BAD_INPUT, run_guarded

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    status = [0]

    def action() -> None:
        status[0] = args.module.run(args)

    guarded = run_guarded(action)
    return guarded if guarded == EXIT_BAD_INPUT else status[0]


if __name__ == "__main__":
    sys.exit(main())
