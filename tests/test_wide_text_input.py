"""An input saved as UTF-16 (Windows' "Unicode": a byte order mark, a NUL beside every
character) is refused at once, saying so, rather than read as lines of garbage. Through
the real command, against a simulator process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.benchmarks.harness import simulator
from tests.test_multiregion import HOME
from tests.test_multiregion import _env as run_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("given", ["file", "stdin"])
def test_an_input_saved_as_utf16_is_refused_naming_its_encoding(
    tmp_path: Path, encoding: str, given: str
) -> None:
    """It was read byte by byte as UTF-8: a line 'not valid UTF-8', the next "invalid
    character '\\x00'", one more of a lone NUL, exit 1; a person was not told the file's
    encoding was the fault. Now: 66, one error naming it, and no line read or sent."""
    with simulator(tmp_path, jobs=2, project=HOME) as sim:
        text = "\n".join(sim.ids) + "\n"
        data = text.encode(encoding)
        if encoding == "utf-16-be":
            data = b"\xfe\xff" + data
        source = tmp_path / "ids.txt"
        source.write_bytes(data)
        args = ["run", "-i", "-" if given == "stdin" else str(source), "--yes"]
        done = subprocess.run(
            [sys.executable, "-m", "worker", *args], env=run_env(sim.url), input=data,
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert sim.control("/_sim/deleted")["ids"] == []
    assert done.returncode == 66, done.stderr.decode()
    events = [orjson.loads(x) for x in done.stdout.splitlines() if x.startswith(b"{")]
    assert not [e for e in events if e["event"].startswith("job.")]
    (summary,) = [e for e in events if e["event"] == "run.summary"]
    assert "is UTF-16 or UTF-32 text" in summary["error"]
    assert "iconv -f UTF-16 -t UTF-8" in summary["error"]
