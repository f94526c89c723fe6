"""What ``--help`` says, in the user's words: usage lines, flag groups, placeholders, examples.

Data only, and the standard library only, so ``--help`` stays fast. ``worker.cli`` builds the
parser from it; ``worker.completion`` reads the parser it builds.
"""

from __future__ import annotations

USAGE = {
    "run": "%(prog)s (--input FILE | --plan FILE [--exclude FILE] | FILTER... [--all]) "
    "[--dry-run | --yes] [options]",
    "discover": "%(prog)s FILTER... [--all] [--plan FILE | -o table|ids|jsonl] [options]",
    "plan": "%(prog)s show PLAN [--plan-key-file FILE]",
    "serve": "%(prog)s [--redis-url URL] [--rate CALLS/S] [options]",
    "enqueue": "%(prog)s --input FILE [--redis-url URL] [options]",
    "simulate": "%(prog)s [--port PORT] [--jobs N] [--quota CALLS/S] [options]",
    "demo": "%(prog)s [--jobs N]",
    "check": "%(prog)s [--region REGION | --endpoint URL] [--project-id ID] [options]",
    "report": "%(prog)s --ledger FILE [--format summary|jsonl|csv] [--output FILE]",
    "completion": "%(prog)s bash|zsh",
}
"""What each command's usage line says: its shape, not every one of its flags."""

INPUT = "input"
SAFETY = "safety: what may be deleted, and when"
RATE = "rate, retries and time limits"
OUTPUT = "output"
CONNECTION = "connection and credentials"
QUEUE = "queue (Redis) and health"
SETTINGS = "settings file"
GROUPS = (INPUT, SAFETY, RATE, OUTPUT, CONNECTION, QUEUE, SETTINGS)
"""Flag groups, in the order ``--help`` shows them; safety flags stand on their own."""

_CONNECTION_FLAGS = (
    "--region", "--endpoint", "--project-id", "--iam-endpoint", "--ak", "--sk",
    "--security-token", "--ak-file", "--sk-file", "--security-token-file", "--ca-bundle",
    "--credential-source", "--metadata-url", "--connect-timeout", "--read-timeout",
)  # fmt: skip
_RATE_FLAGS = ("--batch-size", "--concurrency", "--rate", "--burst", "--max-attempts",
               "--max-retry-after", "--retry-base-delay", "--grace", "--deadline")  # fmt: skip
_SAFETY_FLAGS = ("--dry-run", "--yes", "--max-deletions", "--confirm-project-over", "--protect",
                 "--protect-file", "--protected-types", "--protected-statuses",
                 "--max-fraction", "--plan-key-file", "--recheck-max-age",
                 "--allowed-projects", "--allowed-endpoints")  # fmt: skip

SETTING_GROUP = {
    **dict.fromkeys(_CONNECTION_FLAGS, CONNECTION),
    **dict.fromkeys(_RATE_FLAGS, RATE),
    **dict.fromkeys(_SAFETY_FLAGS, SAFETY),
    **dict.fromkeys(("--ledger", "--shard"), INPUT),
    **dict.fromkeys(("--log-format", "--log-level", "--stats-interval"), OUTPUT),
}
"""The group of each setting flag; a flag not named here is a queue one (``serve``'s Redis
and health port: a command without a queue shows no such group)."""

METAVAR = {
    "--region": "REGION", "--endpoint": "URL", "--project-id": "ID", "--iam-endpoint": "URL",
    "--allowed-projects": "IDS", "--allowed-endpoints": "URLS", "--http-host": "HOST",
    "--ak": "KEY", "--sk": "KEY", "--security-token": "TOKEN", "--ak-file": "FILE",
    "--sk-file": "FILE", "--security-token-file": "FILE", "--ca-bundle": "FILE",
    "--credential-source": "SOURCE", "--metadata-url": "URL", "--batch-size": "N",
    "--concurrency": "N", "--rate": "CALLS/S", "--burst": "N", "--max-attempts": "N",
    "--deadline": "SECONDS", "--connect-timeout": "SECONDS", "--read-timeout": "SECONDS",
    "--max-retry-after": "SECONDS", "--retry-base-delay": "SECONDS", "--grace": "SECONDS",
    "--ledger": "FILE",
    "--max-deletions": "N", "--shard": "I/N", "--confirm-project-over": "N",
    "--protect": "RULE", "--protect-file": "FILE", "--protected-types": "TYPES",
    "--protected-statuses": "STATUSES", "--max-fraction": "SHARE",
    "--recheck-max-age": "SECONDS", "--plan-key-file": "FILE", "--redis-url": "URL",
    "--stream": "KEY", "--group": "NAME", "--consumer": "NAME", "--max-deliveries": "N",
    "--reclaim-after": "SECONDS", "--redis-timeout": "SECONDS", "--http-port": "PORT",
    "--outcomes-max-len": "N",
    "--outcomes-max-age": "SECONDS", "--dead-max-len": "N", "--dead-max-age": "SECONDS",
    "--stats-interval": "SECONDS", "--log-format": "FORMAT", "--log-level": "LEVEL",
}  # fmt: skip
"""What each setting flag's value is called in ``--help``: what to type, not a field name
(every setting flag that takes a value has one)."""

CHOICES = {
    "--credential-source": ("auto", "settings", "env", "profile", "pod-identity", "metadata"),
    "--log-format": ("auto", "json", "console"),
    "--log-level": ("debug", "info", "warning", "error"),
}
"""The values of the setting flags that take one of a fixed set, for shell completion (the
settings check them, as they check the same setting from the environment or the config
file; a test keeps these the settings' own)."""

_FILE = "a file path"
EXPECTED = {
    "--region": "a region such as cn-north-4",
    "--endpoint": "a URL such as https://modelarts.cn-north-4.myhuaweicloud.com",
    "--project-id": "a project id (1 to 64 letters, digits and hyphens)",
    "--allowed-projects": "project ids, comma-separated",
    "--allowed-endpoints": "endpoint URLs, comma-separated",
    "--iam-endpoint": "a URL such as https://iam.cn-north-4.myhuaweicloud.com",
    "--ak": "an access key", "--sk": "a secret key", "--security-token": "a security token",
    "--ak-file": _FILE, "--sk-file": _FILE, "--security-token-file": _FILE,
    "--ca-bundle": _FILE, "--ledger": _FILE, "--protect-file": _FILE, "--plan-key-file": _FILE,
    "--credential-source": "one of auto, settings, env, profile, pod-identity or metadata",
    "--metadata-url": "a URL such as http://169.254.169.254",
    "--rate": "a number of calls per second or 'auto'",
    "--shard": "I/N (such as 0/4) or auto/N",
    "--protect": "a rule: id:ID, name:GLOB, a glob, or an id-or-name",
    "--protected-types": "job types, comma-separated",
    "--protected-statuses": "job statuses, comma-separated",
    "--redis-url": "a redis://, rediss:// or unix:// URL",
    "--stream": "the name of a Redis Stream", "--group": "the name of a consumer group",
    "--consumer": "a consumer name",
    "--http-host": "an IP address to listen on, such as 0.0.0.0 or 127.0.0.1",
    "--log-format": "one of auto, json or console",
    "--log-level": "one of debug, info, warning or error",
}  # fmt: skip
"""What each setting flag that takes text must be, for the flag given empty (``--stream ''``):
a usage error (64) said like a number flag given no number, never pydantic's words."""

EXAMPLES = {
    "run": """\
examples:
  # the recommended flow: a reviewed plan, a dry run, then the real run
  devserver-reaper run --plan plan.txt --dry-run
  devserver-reaper run --plan plan.txt --ledger reaper.db --results results.jsonl

  # a file of ids, no prompt, resumable, capped, running jobs kept
  devserver-reaper run -i stale-jobs.txt --yes --ledger reaper.db --max-deletions 5000 \\
      --protected-statuses PROCESSING

  # strike ids out of a reviewed plan without discovering again
  devserver-reaper run --plan plan.txt --exclude keep.txt

  # a policy, not a list (a nightly CronJob): select with discover's filters, seal, apply
  devserver-reaper run --status FINISHED,FAILED --older-than 30d --max-fraction 0.5 \\
      --max-deletions 20000 --protected-statuses PROCESSING --yes

  # straight from discover (small, obvious clean-ups)
  devserver-reaper discover --name-glob 'diag-*' | devserver-reaper run -i - --yes""",
    "discover": """\
examples:
  # seal what would go into a plan, to review and apply with run --plan
  devserver-reaper discover --status FINISHED --type ASCEND_DIAGNOSIS --older-than 30d \\
      --plan plan.txt

  # any of several statuses, in any case; a table and a review on a terminal
  devserver-reaper discover --status finished,failed --type COMMON

  # full records of one user's old jobs, as JSON lines
  devserver-reaper discover --user-name alice --older-than 2026-01-01 --output jsonl""",
    "plan": """\
examples:
  devserver-reaper plan show plan.txt
  devserver-reaper plan show plan.txt --plan-key-file /run/secrets/plan.key""",
    "serve": """\
examples:
  devserver-reaper serve --redis-url redis://redis:6379/0 --rate 20 --http-port 8080
  devserver-reaper serve --rate auto --protected-statuses PROCESSING""",
    "enqueue": """\
examples:
  devserver-reaper enqueue -i ids.txt.gz --redis-url redis://redis:6379/0
  devserver-reaper discover --status FINISHED | devserver-reaper enqueue -i -""",
    "simulate": """\
examples:
  # a project of 20,000 jobs with a quota and some faults; paste the block it prints
  devserver-reaper simulate --jobs 20000 --quota 50 --fault-rate 0.05
  devserver-reaper simulate --port 0 --ids-file ids.txt   # any free port; the ids, to try run""",
    "demo": """\
examples:
  devserver-reaper demo
  devserver-reaper demo --jobs 1000""",
    "check": """\
examples:
  devserver-reaper check                                  # settings from REAPER_* or a profile
  devserver-reaper check --region cn-north-4 --project-id 0123456789abcdef0123456789abcdef""",
    "report": """\
examples:
  devserver-reaper report --ledger reaper.db
  devserver-reaper report --ledger reaper.db --format csv -o outcomes.csv
  devserver-reaper report shard-0.db shard-1.db shard-2.db   # every shard of a sharded run""",
    "completion": """\
examples:
  source <(devserver-reaper completion bash)     # in ~/.bashrc
  source <(devserver-reaper completion zsh)      # in ~/.zshrc""",
}
"""An Examples section for every command's ``--help``."""
