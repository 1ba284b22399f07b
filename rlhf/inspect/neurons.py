"""(being written) rlhf inspect neurons."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("rlhf inspect neurons: not written yet")
    return 1
