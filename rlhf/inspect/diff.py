"""(being written) rlhf inspect diff."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("rlhf inspect diff: not written yet")
    return 1
