"""(being written) rlhf inspect explain."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("rlhf inspect explain: not written yet")
    return 1
