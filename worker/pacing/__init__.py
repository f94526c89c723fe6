"""How fast and how often calls go out: token bucket, ``--rate auto``, the Redis-shared limit,
the circuit breaker and the retry policy."""
