"""``devserver-reaper plan show PLAN``: check a plan's seal and show what it holds.

The same review ``discover`` shows on a terminal (counts by type, status, user and age, what
protection left out, the time the deletion would take at the configured rate) and the next
command, read from the plan's header once its seal is checked (with ``plan_key_file`` when
the plan was sealed with a plan key). Exit 64 for a plan that is not one or was altered, 66
for a file that cannot be read, 78 for a plan key that cannot be read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.errors import ConfigError, InputUnreadable, UsageError
from worker.exit_codes import ExitCode
from worker.settings import Settings
from worker.stdio import Report
from worker.stops import checkpoint


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker.commands.selection import plan_review
    from worker.discovery.plan import read_header
    from worker.settings import read_plan_key
    from worker.terminal.failure import refused
    from worker.terminal.wrap import for_terminal

    try:
        key = read_plan_key(settings)
        header = read_header(Path(args.path), key=key)
    except (ConfigError, InputUnreadable, UsageError) as exc:
        return refused("plan", exc)
    checkpoint()  # a stop whose exit was lost while the plan was read: nothing shown
    out = Report("plan show")
    out.write(for_terminal(out, plan_review(header, settings, args.path)) + "\n")
    out.close()
    return ExitCode.OK
