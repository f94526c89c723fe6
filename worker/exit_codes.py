"""Exit codes, as docs/reference.md fixes them. Scripts and podFailurePolicies rely on them."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    SOME_FAILED = 1  # the run finished, but some ids ended failed or rejected
    USAGE = 64
    NO_INPUT = 66
    UNAVAILABLE = 69  # the API stayed unreachable or unavailable after retries
    INTERRUPTED = 75  # SIGTERM, SIGINT or deadline with work left: run again
    NO_PERMISSION = 77  # 401/403
    CONFIG = 78
