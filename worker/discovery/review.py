"""What a person looks at before deleting: a selection counted by type, status, user and age.

:class:`Review` counts jobs as discovery selects them (constant memory, whatever the size of
the selection); its JSON form goes into the plan's header, so ``plan show`` prints the same
review without reading the jobs again. :func:`render` turns that form into aligned text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.input.intake import escape
from worker.types import JobRecord, iso

SHOWN_LIMIT = 120
"""Characters of a name the review and the table show, once escaped."""

AGE_BUCKETS = ((1, "< 1 day"), (7, "1-7 days"), (30, "7-30 days"), (90, "30-90 days"),
               (365, "90-365 days"), (math.inf, "> 1 year"))  # fmt: skip
AGE_LABELS = (*(label for _, label in AGE_BUCKETS), "unknown")
TOP = 8
"""Rows shown per table before the rest is summed as "(N more)"."""


@dataclass(slots=True)
class Review:
    """Counts of a selection, as of ``now``."""

    now: datetime
    selected: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    by_user: Counter[str] = field(default_factory=Counter)
    by_age: Counter[str] = field(default_factory=Counter)
    protected: Counter[str] = field(default_factory=Counter)
    oldest: datetime | None = None
    newest: datetime | None = None

    def add(self, record: JobRecord) -> None:
        self.selected += 1
        self.by_type[record.type or "(none)"] += 1
        self.by_status[record.status or "(none)"] += 1
        self.by_user[record.user_name or "(none)"] += 1
        created = record.create_at
        if created is None:
            self.by_age["unknown"] += 1
            return
        days = (self.now - created).total_seconds() / 86400
        self.by_age[next(label for limit, label in AGE_BUCKETS if days < limit)] += 1
        self.oldest = created if self.oldest is None else min(self.oldest, created)
        self.newest = created if self.newest is None else max(self.newest, created)

    def left_out(self, why: str) -> None:
        """A job the filters matched that protection kept (``why``: the rule)."""
        self.protected[why] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "by_type": dict(self.by_type.most_common()),
            "by_status": dict(self.by_status.most_common()),
            "by_user": dict(self.by_user.most_common()),
            "by_age": {label: self.by_age[label] for label in AGE_LABELS if self.by_age[label]},
            "oldest": iso(self.oldest),
            "newest": iso(self.newest),
            "protected": dict(self.protected.most_common()),
        }


def estimate_s(jobs: int, *, rate: float | str, batch_size: int, page: int = 500) -> float | None:
    """Seconds to delete ``jobs`` at ``rate`` calls/s: a DELETE per batch and a list call per
    page of re-check; ``None`` at ``--rate auto`` (the rate is found, not known)."""
    if isinstance(rate, str) or rate <= 0:
        return None
    calls = math.ceil(jobs / batch_size) + math.ceil(jobs / page)
    return calls / rate


def render(review: Mapping[str, Any], *, heading: str, estimate: float | None) -> str:
    """The review as aligned text: a table per count, then the times and what was left out."""
    tables = [(title, _shown(review.get(key) or {})) for key, title in (
        ("by_type", "type"), ("by_status", "status"), ("by_user", "user"), ("by_age", "age"),
        ("protected", "left out by protection"))]  # fmt: skip
    names = [name for _, counts in tables for name in list(counts)[:TOP]]
    width = max([len(name) for name in names] + [len("(99 more)")])
    lines = [heading]
    for title, counts in tables:
        if not counts:
            continue
        if title == "left out by protection":
            lines.append(f"  {title}: {sum(counts.values()):,}")
        else:
            lines.append(f"  {title}")
        if title == "age":
            ordered = {label: counts[label] for label in AGE_LABELS if label in counts}
        else:
            ordered = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        lines += _rows(ordered, width)
        if title == "age" and review.get("oldest"):
            lines.append(f"    oldest {review['oldest']}   newest {review['newest']}")
    if estimate is not None:
        lines.append(f"  estimated time to delete: {_duration(estimate)} at the configured rate")
    return "\n".join(lines)


def _shown(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` with each name as it may be shown on a terminal: a type, status or user is
    the API's text, and one holding ``ESC[1A ESC[2K`` would erase the review's line above it
    on the reviewer's screen. Control and format characters are escaped (``\\x1b``)."""
    out: dict[str, int] = {}
    for name, count in counts.items():
        key = escape(str(name), SHOWN_LIMIT)
        out[key] = out.get(key, 0) + count
    return out


def _rows(counts: Mapping[str, int], width: int) -> list[str]:
    items = list(counts.items())
    shown, rest = items[:TOP], items[TOP:]
    rows = [f"    {name:<{width}}  {count:>9,}" for name, count in shown]
    if rest:
        rows.append(f"    {f'({len(rest)} more)':<{width}}  {sum(n for _, n in rest):>9,}")
    return rows


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
