"""The one ``aiohttp.ClientSession`` a process uses to talk to the API.

Kept apart from the client so the sizing and TLS decisions live in one small place: the
connector is bounded to the dispatcher's concurrency (plus a little headroom for the show
calls that reconcile ambiguous deletes), certificates are always verified, and nothing is
sent that the signer did not see.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import aiohttp

import worker
from worker.errors import ConfigError, file_problem

USER_AGENT = (
    f"devserver-reaper/{worker.__version__} "
    f"(+aiohttp/{aiohttp.__version__}; python/{sys.version_info.major}.{sys.version_info.minor})"
)

SHOW_HEADROOM = 2
"""Connections beyond ``concurrency``: show calls that reconcile a batch must not queue
behind the DELETEs they are reconciling."""

_SKIPPED_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
"""aiohttp adds these by itself. We send only headers we signed, and by not advertising
``Accept-Encoding`` the server has no reason to compress (a server that compresses anyway
is still decoded by aiohttp, not handed to the JSON parser as gzip bytes)."""


def tls_context(ca_bundle: Path, named: str = "ca_bundle") -> ssl.SSLContext:
    """Default verification (system store, host names checked), plus ``ca_bundle``.

    The bundle is added to, not substituted for, the system store: a private CA for a proxy
    or a test server must not switch off trust in the public ones. A bundle that cannot be
    read, or is no PEM certificate bundle, is a configuration error (exit 78) in words of
    the file, not OpenSSL's, naming the setting as it was given (``named``: ``--ca-bundle``),
    found before any call is made.
    """
    try:  # the file as it is now: a bundle changed since it was loaded is loaded again
        info = ca_bundle.stat()
        # ctime too: a file rewritten in place with its size and mtime put back (cp -p,
        # touch -r) is another bundle; no one sets a ctime back
        stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    except OSError:
        stamp = None  # loading it says what is wrong
    known = _LOADED.get(ca_bundle)
    if known is not None and stamp is not None and known[0] == stamp:
        return known[1]
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except ssl.SSLError as exc:
        raise ConfigError(f"{named} {ca_bundle} is not a PEM certificate bundle: "
                          f"{_not_pem(exc)}") from None  # fmt: skip
    except OSError as exc:
        raise ConfigError(f"{named} {ca_bundle} cannot be read: {file_problem(exc)}") from None
    if stamp is not None:
        _LOADED[ca_bundle] = (stamp, context)
    return context


_LOADED: dict[Path, tuple[tuple[int, int, int, int, int], ssl.SSLContext]] = {}
"""Each CA bundle's context once loaded, by path, with the file's identity, size and times
then: the check before anything is sent (``wiring.check_ca_bundle``) and each session after
it (an IAM look-up's, the run's) share one context, the bundle and the system store read
once (20 ms of CPU each time)."""


def _not_pem(exc: ssl.SSLError) -> str:
    """What OpenSSL found wrong with a CA bundle, said of the file: it said "[X509:
    NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154)" of a text file,
    a DER certificate, a private key or an empty file alike, and "[X509] PEM lib" of a
    certificate whose base64 is damaged."""
    if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return ("no certificate found in it (a bundle holds \"-----BEGIN CERTIFICATE-----\" "
                "blocks; a DER file converts with openssl x509 -inform der -in FILE -out "
                "FILE.pem)")  # fmt: skip
    return "a certificate in it is damaged (it does not decode)"


def make_session(
    *,
    concurrency: int,
    connect_timeout: float,
    read_timeout: float,
    ca_bundle: Path | None = None,
    ca_bundle_named: str = "ca_bundle",
) -> aiohttp.ClientSession:
    """Build the process's session. Call it from inside the running event loop.

    No total timeout: a slow but live answer is bounded by ``read_timeout`` between reads,
    and the caller's deadline bounds the rest. Redirects are the caller's choice per request
    (the client refuses them: a redirect would replay signed headers to another URL).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    connector = aiohttp.TCPConnector(
        limit=concurrency + SHOW_HEADROOM,
        limit_per_host=0,
        # Without a bundle, aiohttp's own verified context (the system store, host names
        # checked, as tls_context's), made when aiohttp is imported: another one costs 20 ms
        # of CPU reading the store, for nothing where every endpoint is http://.
        ssl=True if ca_bundle is None else tls_context(ca_bundle, ca_bundle_named),
        force_close=False,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=connect_timeout,
        sock_connect=connect_timeout,
        sock_read=read_timeout,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        skip_auto_headers=_SKIPPED_AUTO_HEADERS,
        raise_for_status=False,
        auto_decompress=True,
        trust_env=False,
        # No cookie jar: a cookie a gateway, load balancer or proxy sets would otherwise go
        # back on every later call as a header the signer never saw.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    # aiohttp silently resends an idempotent request (GET, and DELETE too) once when the
    # connection drops, replaying the old signature. That attempt would be invisible to the
    # dispatcher, which must know a DELETE may have been applied in order to reconcile it.
    # There is no public switch; aiohttp's own test client flips this same attribute.
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session
