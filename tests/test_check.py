"""`devserver-reaper check` against `devserver-reaper simulate` running in another process."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.e2e import SIM_SK, reaper, reaper_env

pytestmark = pytest.mark.anyio

CANARY_SK = "canary-check-secret-9QX"


@asynccontextmanager
async def simulator_process(*args: str) -> AsyncIterator[str]:
    """Start `simulate --port 0` and yield its URL once it prints its ready line."""
    process = await anyio.open_process(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", *args]
    )
    async with process:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(20):
            async for chunk in process.stdout:
                buffer += chunk
                if b"\n" in buffer:
                    break
        match = re.search(r"listening on (http://\S+)", buffer.decode())
        assert match, buffer
        try:
            yield match.group(1)
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await process.wait() == 0


async def test_check_succeeds_and_reports_source_and_skew() -> None:
    async with simulator_process() as url:
        done = await reaper(["check"], reaper_env(url))
    assert done.code == 0, done.stdout + done.stderr
    assert "result       OK" in done.stdout
    assert "credentials  settings" in done.stdout
    assert re.search(r"clock skew   [+-]\d+\.\ds", done.stdout)
    assert SIM_SK not in done.stdout + done.stderr


async def test_check_exits_77_on_a_wrong_secret_and_never_prints_it() -> None:
    async with simulator_process() as url:
        done = await reaper(["check"], reaper_env(url, REAPER_SK=CANARY_SK))
    assert done.code == 77
    assert CANARY_SK not in done.stdout + done.stderr
    result, request, fix = done.stdout.splitlines()[3:]  # no event in the middle of it
    assert result == (
        "result       REJECTED: HTTP 401 APIGW.0301: Incorrect IAM authentication "
        "information: the signature does not match"
    )
    assert re.fullmatch(r"request id   \w+", request)  # said once, on a line of its own
    assert done.stdout.count(request.split()[-1]) == 1
    assert fix.startswith("fix          check the access key and secret key")


async def test_check_exits_78_when_the_project_id_is_not_the_servers() -> None:
    async with simulator_process() as url:
        done = await reaper(["check"], reaper_env(url, REAPER_PROJECT_ID="other-project"))
    assert done.code == 78, done.stdout + done.stderr
    assert "NO SUCH API" in done.stdout and "APIGW.0101" in done.stdout


async def test_check_finds_keys_in_the_profile_file(tmp_path: Path) -> None:
    profile = tmp_path / "credentials"
    profile.write_text(f"[basic]\nak = DEMOAK\nsk = {SIM_SK}\nproject_id = demo-project\n")
    async with simulator_process() as url:
        env = reaper_env(url, HUAWEICLOUD_SDK_CREDENTIALS_FILE=str(profile))
        for name in ("REAPER_AK", "REAPER_SK", "REAPER_PROJECT_ID"):
            env.pop(name)
        done = await reaper(["check"], env)
    assert done.code == 0, done.stdout + done.stderr
    assert "credentials  profile" in done.stdout
    assert "project      demo-project" in done.stdout


async def test_check_exits_69_when_nothing_answers() -> None:
    done = await reaper(["check"], reaper_env("http://127.0.0.1:9"))
    assert done.code == 69
    assert "UNREACHABLE" in done.stdout


async def test_check_exits_78_on_bad_settings() -> None:
    done = await reaper(
        ["check", "--endpoint", "http://example.com"], reaper_env("http://127.0.0.1:9")
    )
    assert done.code == 78
    assert "endpoint" in done.stderr


@pytest.mark.parametrize("problem", ["missing", "directory", "not pem"])
async def test_check_exits_78_on_a_ca_bundle_it_cannot_load(tmp_path: Path, problem: str) -> None:
    bundle = {"missing": tmp_path / "nope.pem", "directory": tmp_path}.get(problem)
    if bundle is None:
        bundle = tmp_path / "garbage.pem"
        bundle.write_text("not a certificate\n")
    done = await reaper(["check", "--ca-bundle", str(bundle)], reaper_env("https://127.0.0.1:9"))
    assert done.code == 78, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "ca" in done.stderr.lower()


@pytest.mark.parametrize(
    ("variable", "content"),
    [
        ("HUAWEICLOUD_SDK_CREDENTIALS_FILE", b"[basic]\nak = AK\nsk = \xff\xfe\n"),
        ("REAPER_SK_FILE", b"line-one\nline-two\n"),
    ],
)
async def test_check_exits_78_on_keys_it_could_not_send(
    tmp_path: Path, variable: str, content: bytes
) -> None:
    """A profile that is not UTF-8, or a secret file of two lines (a line break cannot go
    into a header): a clear 78, not a traceback."""
    source = tmp_path / "keys"
    source.write_bytes(content)
    env = reaper_env("http://127.0.0.1:9", **{variable: str(source)})
    if variable == "HUAWEICLOUD_SDK_CREDENTIALS_FILE":  # the keys come from the profile
        del env["REAPER_AK"], env["REAPER_SK"]
    done = await reaper(["check"], env)
    assert done.code == 78, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "line-two" not in done.stdout + done.stderr


async def test_simulate_prints_a_block_that_points_every_command_at_it_when_pasted() -> None:
    """A newcomer pastes what ``simulate`` printed into a shell, and ``check`` passes."""
    process = await anyio.open_process(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", "--jobs", "3"]
    )
    async with process:
        assert process.stdout is not None
        printed = b""
        with anyio.fail_after(20):
            async for chunk in process.stdout:
                printed += chunk
                if b"# then:" in printed:
                    break
        try:
            block = printed.decode()
            export = next(line for line in block.splitlines() if line.startswith("export "))
            env = {k: v for k, v in reaper_env("unused").items() if not k.startswith("REAPER_")}
            done = await anyio.run_process(
                ["bash", "-c", f'{export}\n"$0" -m worker check', sys.executable],
                env=env,
                check=False,
            )
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await process.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"result       OK" in done.stdout
    assert "not a secret" in block


@pytest.mark.parametrize("stdout", ["> /dev/full", "| (exec 0<&-; sleep 1)"])
async def test_check_and_plan_show_cut_short_by_stdout_keep_their_exit_code_in_words(
    tmp_path: Path, stdout: str
) -> None:
    """``check | head -1`` and ``plan show PLAN > /dev/full`` ended in an OSError traceback
    and exit 1, which a script reads as a failed check; the keys were fine. The exit code is
    the command's own; a full disk is said on stderr in one line, a reader that left is not."""
    import shlex

    async with simulator_process("--jobs", "20") as url:
        env = reaper_env(url)
        plan = tmp_path / "plan.txt"
        made = await reaper(["discover", "--all", "--plan", str(plan)], env)
        assert made.code == 0, made.stderr
        for command in (["check"], ["plan", "show", str(plan)]):
            line = shlex.join([sys.executable, "-m", "worker", *command])
            done = await anyio.run_process(
                ["bash", "-c", f"set -o pipefail; {line} {stdout}"], env=env, check=False
            )
            err = done.stderr.decode()
            assert done.returncode == 0, (command, err)
            assert "Traceback" not in err
            said = "devserver-reaper " + ("plan show" if command[0] == "plan" else "check")
            if "full" in stdout:
                assert f"{said}: cannot write stdout: no space left on device" in err, err
            else:
                assert "cannot write stdout" not in err, err
