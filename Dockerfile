# syntax=docker/dockerfile:1.7
# devserver-reaper: a slim, non-root image whose root filesystem can be mounted read-only.
#
#   docker build -t devserver-reaper .
#   docker run --rm --read-only --tmpfs /tmp devserver-reaper run --help
#
# Pin the bases by digest (name:tag@sha256:...) in your registry mirror; the tags below are
# exact versions, never "latest".

# -- uv, the only build tool -------------------------------------------------------------------
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# -- builder: resolve from the lock file into /opt/venv -----------------------------------------
FROM python:3.12.12-slim-bookworm AS builder
COPY --from=uv /uv /uvx /bin/
# Bytecode is compiled here, so nothing writes .pyc at run time on a read-only root; copy
# (not hard-link) out of the cache mount; use the image's Python, never download one.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.12 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-install-project --no-dev
# Then the project itself, installed as a regular (not editable) package.
COPY README.md ./
COPY worker ./worker
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable

# -- runtime --------------------------------------------------------------------------------------
FROM python:3.12.12-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="devserver-reaper" \
      org.opencontainers.image.description="Bulk deletion of Huawei Cloud ModelArts DevServer jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini as PID 1: it forwards SIGTERM to the worker (which drains and exits 75 or 0) and reaps
# zombies; the Python process itself never runs as PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and fsGroup can match it.
# The ledger volume is the only place the worker writes besides /tmp.
RUN groupadd --system --gid 10001 reaper \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin reaper \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/devserver-reaper
COPY --from=builder /opt/venv /opt/venv
# HOME is /tmp: nothing the worker runs needs a home, and /tmp is the writable mount when the
# root filesystem is read-only. No credentials here: they come from a mounted Secret
# (REAPER_AK_FILE/REAPER_SK_FILE), pod identity or the ECS metadata service.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    REAPER_LOG_FORMAT=json
WORKDIR /var/lib/devserver-reaper
VOLUME ["/var/lib/devserver-reaper"]
USER 10001:10001
# serve: /healthz, /readyz and /metrics.
EXPOSE 8080
# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself; and the one-shot
# `run` command has no server to check.
ENTRYPOINT ["/usr/bin/tini", "--", "devserver-reaper"]
CMD ["--help"]
