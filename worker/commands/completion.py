"""``devserver-reaper completion bash|zsh``: print a completion script to source."""

from __future__ import annotations

import argparse
import sys

from worker.exit_codes import ExitCode


def main(args: argparse.Namespace) -> int:
    from worker import completion
    from worker.cli import build_parser

    write = completion.bash if args.shell == "bash" else completion.zsh
    sys.stdout.write(write(build_parser()))
    return ExitCode.OK
