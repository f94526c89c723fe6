"""Which ids one shard of a sharded run takes: a stable hash of the id, modulo the count.

``run --shard I/N`` (or ``auto/N`` under a Kubernetes Indexed Job, whose controller sets
``JOB_COMPLETION_INDEX`` in each pod) reads the whole input and keeps the ids whose hash
falls in shard ``I``. Every shard reads the same input and the shards partition it, so each
id is owned by exactly one shard, whatever the order of the lines or the number of pods
running at once. Invalid lines belong to no id: shard 0 alone reports them, so merged
results still hold exactly one line per line read.

The hash is BLAKE2b, not ``hash()``: Python salts string hashes per process, and two pods
must agree on which of them owns an id.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from worker.errors import ConfigError
from worker.types import Candidate, Rejection

INDEX_VARIABLE = "JOB_COMPLETION_INDEX"
MAX_SHARDS = 10_000

_SHARD_RE = re.compile(r"\s*(\d+|auto)\s*/\s*(\d+)\s*")


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, job_id: str) -> bool:
        digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] = os.environ) -> Shard:
        """``I/N`` or ``auto/N``; ``ConfigError`` (exit 78) in the user's words otherwise."""
        match = _SHARD_RE.fullmatch(text)
        if match is None:
            raise ConfigError(
                f"--shard must be INDEX/COUNT, e.g. 0/4, or auto/COUNT under an Indexed Job; "
                f"got {text[:40]!r}"
            )
        index_text, count_text = match.groups()
        count = int(count_text)
        if not 1 <= count <= MAX_SHARDS:
            raise ConfigError(f"--shard: the count must be 1 to {MAX_SHARDS:,}, not {count}")
        if index_text == "auto":
            index_text = environ.get(INDEX_VARIABLE, "").strip()
            if not index_text.isdigit():
                raise ConfigError(
                    f"--shard auto/{count} reads the shard from {INDEX_VARIABLE}, which is "
                    "not set: that is set in the pods of a Kubernetes Indexed Job; "
                    "elsewhere give the index, e.g. --shard 0/4"
                )
        index = int(index_text)
        if index >= count:
            raise ConfigError(f"--shard {index}/{count}: the index must be below the count")
        return cls(index, count)


@dataclass(slots=True)
class ShardFilter:
    """Passes on what ``shard`` owns and counts what it leaves to the other shards."""

    shard: Shard
    others: int = field(default=0)

    def select(self, entries: Iterable[Candidate | Rejection]) -> Iterator[Candidate | Rejection]:
        owns, first = self.shard.owns, self.shard.index == 0
        for entry in entries:
            if owns(entry.job_id) if isinstance(entry, Candidate) else first:
                yield entry
            else:
                self.others += 1

    def __repr__(self) -> str:
        return f"ShardFilter(shard={self.shard}, others={self.others})"
