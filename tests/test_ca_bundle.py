"""A CA bundle (``--ca-bundle``) as its user meets it: one that cannot be used is refused
before anything is sent, dry run or not, in words of the file (not OpenSSL's); a
certificate refused although a bundle was given is not answered "give --ca-bundle"."""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import trustme
from aiohttp import web

from tests.e2e import reaper, reaper_env, write_ids
from tests.test_projects import ScriptedIam, by_region, listing
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_env")]


def _bundles(folder: Path) -> dict[str, tuple[Path, str]]:
    """Bundles that cannot be used, each with what the refusal must say of it."""
    ca = trustme.CA()
    der = folder / "ca.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode()))
    text = folder / "notes.txt"
    text.write_text("not a certificate\n")
    damaged = folder / "damaged.pem"
    pem = ca.cert_pem.bytes().decode().splitlines()
    damaged.write_text("\n".join([*pem[:2], "!!!!" + pem[2][4:], *pem[3:]]) + "\n")
    return {
        "missing": (folder / "nope.pem", "cannot be read: no such file"),
        "directory": (folder, "cannot be read: is a directory"),
        "der": (der, "is not a PEM certificate bundle: no certificate found in it"),
        "text": (text, "is not a PEM certificate bundle: no certificate found in it"),
        "damaged": (damaged, "is not a PEM certificate bundle: a certificate in it is damaged"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "der", "text", "damaged"])
async def test_a_dry_run_refuses_a_ca_bundle_it_cannot_use_as_the_run_would(
    tmp_path: Path, kind: str
) -> None:
    """``run --dry-run --ca-bundle FILE`` with a bundle the real run cannot load: 78 and the
    file named with what is wrong with it, nothing sent (a dry run makes no session, and
    exited 0 with every id skipped; the run said OpenSSL's "[X509:
    NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154)")."""
    bundle, said = _bundles(tmp_path)[kind]
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        for dry in (["--dry-run"], ["--yes"]):
            done = await reaper(
                ["run", "--input", str(ids), "--ca-bundle", str(bundle), *dry],
                reaper_env(sim.url),
            )
            assert done.code == 78, (dry, done.stdout + done.stderr)
            assert f"--ca-bundle {bundle} {said}" in done.stderr, done.stderr
            for openssl in ("X509", "_ssl.c", "Traceback"):
                assert openssl not in done.stderr, done.stderr
        assert sim.stats.delete_calls == 0 and len(sim.job_ids()) == 3


@asynccontextmanager
async def _iam_with_a_certificate_of(ca: trustme.CA) -> AsyncIterator[str]:
    """IAM's project list over TLS on loopback, its certificate signed by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    app.router.add_get("/v3/projects", ScriptedIam(listing(("cn-north-4", "p"))).handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_certificate_refused_with_a_ca_bundle_given_is_not_cured_by_giving_one(
    tmp_path: Path,
) -> None:
    """IAM's certificate signed by a CA the ``--ca-bundle`` given does not hold: the fix
    says to add that CA to the bundle, naming it; it said "give the CA of ... with
    --ca-bundle FILE" to one who had. Without a bundle it still says that."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with _iam_with_a_certificate_of(trustme.CA()) as url:
        given = await reaper(["check", "--ca-bundle", str(other)], by_region(url))
        none = await reaper(["check"], by_region(url))
    assert given.code == none.code == 69, given.stdout + given.stderr
    fix = next(line for line in given.stdout.splitlines() if line.startswith("fix"))
    assert f"add the CA that signed the certificate of {url} to --ca-bundle {other}" in fix, fix
    assert "with --ca-bundle FILE" not in fix
    unbundled = next(line for line in none.stdout.splitlines() if line.startswith("fix"))
    assert f"give the CA of {url} with --ca-bundle FILE" in unbundled, unbundled


_COUNTING_LOADS = (
    "import atexit, runpy, ssl, sys\n"
    "loads, load = [], ssl.SSLContext.load_verify_locations\n"
    "def counted(self, cafile=None, *args, **kwargs):\n"
    "    loads.append(cafile)\n"
    "    return load(self, cafile, *args, **kwargs)\n"
    "ssl.SSLContext.load_verify_locations = counted\n"
    "atexit.register(lambda: sys.stderr.write(f'bundle loads: {len(loads)}\\n'))\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` that says on stderr, as it exits, how many times a CA bundle
was loaded into a TLS context (``bundle loads: N``)."""


async def test_a_run_with_a_ca_bundle_loads_it_once(tmp_path: Path) -> None:
    """``run --ca-bundle FILE`` read and parsed the bundle twice: once in the check before
    anything is sent, and once more for the session (each with the system store, 20 ms of
    CPU). Once is enough: the checked context is the session's; the run deletes as before."""
    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        args = ["run", "--input", str(ids), "--yes", "--ca-bundle", str(bundle)]
        result = await anyio.run_process(
            [sys.executable, "-c", _COUNTING_LOADS, *args],
            env=reaper_env(sim.url), check=False,
        )  # fmt: skip
        assert sim.job_ids() == []
    err = result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    assert "bundle loads: 1\n" in err, err[-2000:]


def test_a_bundle_rewritten_in_place_with_its_size_and_time_kept_is_loaded_again(
    tmp_path: Path,
) -> None:
    """The bundle's context is kept by the file's identity, size and times: a bundle
    rewritten in place (same inode) with another CA, of the same size, and its mtime put
    back (``cp -p``, ``rsync -t``, ``touch -r``) is another file, loaded again. Keyed by
    device, inode, size and mtime alone, the context of the CA that was there before was
    handed out (the new CA never trusted, the old one still)."""
    from worker.api.session import tls_context

    before, after = trustme.CA(), trustme.CA()
    old, new = before.cert_pem.bytes(), after.cert_pem.bytes()
    size = max(len(old), len(new))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(old.ljust(size, b"\n"))  # text outside a PEM block is skipped
    first = tls_context(bundle)
    was = bundle.stat()
    with bundle.open("r+b") as rewrite:  # in place: the same inode
        rewrite.write(new.ljust(size, b"\n"))
    os.utime(bundle, ns=(was.st_atime_ns, was.st_mtime_ns))
    now = bundle.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (was.st_ino, was.st_size, was.st_mtime_ns)
    second = tls_context(bundle)
    trusted = {ssl.DER_cert_to_PEM_cert(der) for der in second.get_ca_certs(binary_form=True)}
    assert new.decode() in trusted and old.decode() not in trusted
    assert first is not second
