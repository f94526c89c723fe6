"""``serve``: the long-running consumer of a Redis Stream, in small modules with one job each.

- ``layout``: the stream keys and what one stream entry means (pure).
- ``inflight``: which entries wait on which ids, and when an entry is done (pure).
- ``consumer``: the Redis Streams calls (read, reclaim, ack, dead-letter, group info).
- ``journal``: serve's outcome sink (events, metrics, the outcomes stream, then acks).
- ``metrics``: the Prometheus registry and a transport wrapper that counts API calls.
- ``health``: ``/healthz``, ``/readyz``, ``/metrics``.
- ``intake``: what the read loop does next, and when a batch is due (pure).
- ``retention``: what is kept in Redis (the trim pass) and where a lost group starts.
- ``outage``: Redis away said once and counted; a key of another type.
- ``service``: the loop that wires them (reads, the dispatch pool of ``worker.pool``,
  pauses, hand-over).
"""
