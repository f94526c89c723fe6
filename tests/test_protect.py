"""Protection: rules, the Guard around a dispatcher, and protected jobs surviving every path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.e2e import SIM_AK, SIM_SK, paced_reader, reaper, reaper_env, results, write_ids
from worker.discovery.filters import Filters
from worker.discovery.guard import Guard, PlanCheck, Protection, load_protection
from worker.errors import ConfigError
from worker.settings import load_settings
from worker.simulator import SimulatorConfig, run_simulator
from worker.types import Batch, JobRecord, Outcome, Result

UUID = "3f2c9a7e-0000-4000-8000-000000000001"


# -- rules -------------------------------------------------------------------------------------


def test_rules_parse_into_ids_and_name_patterns() -> None:
    p = Protection.parse(
        [f"id:{UUID}", "name:prod-*", "keep-?", "nightly-train", " ", "name:exact"],
        types=["service_deploy"],
        statuses=["PROCESSING"],
    )
    assert p.ids == {UUID, "nightly-train"}
    assert p.names == ("prod-*", "keep-?", "nightly-train", "exact")
    assert p.types == {"SERVICE_DEPLOY"} and p.statuses == {"PROCESSING"}
    assert p.needs_record and p.active
    only_ids = Protection.parse([f"id:{UUID}"])
    assert only_ids.active and not only_ids.needs_record
    assert not Protection.parse([]).active


@pytest.mark.parametrize(
    "rule",
    ["id:bad id", "id:", "name:", "nmae:prod-*", "ID:x", "type:X", "job_name:keep", "nam3:x",
     "job-name:x", "name :", "id: "],
)  # fmt: skip
def test_rules_that_name_nothing_valid_are_refused(rule: str) -> None:
    """A mistyped kind (``nmae:prod-*``) used to become a name glob that matched nothing:
    the jobs meant to be kept were deleted."""
    with pytest.raises(ValueError, match="protect rule"):
        Protection.parse([rule])


def test_spaces_around_a_rule_s_kind_and_value_are_not_part_of_them() -> None:
    """``name: prod-a`` was the glob " prod-a", which no name matches: prod-a was deleted."""
    p = Protection.parse(["name: prod-a", "id : job-1", " name :prod-* "])
    assert p.names == ("prod-a", "prod-*") and p.ids == {"job-1"}
    assert p.protects(JobRecord.from_api({"id": "job-9", "name": "prod-a"}))


def test_a_name_that_holds_a_colon_is_protected_through_name() -> None:
    assert Protection.parse(["name:team:prod-*"]).names == ("team:prod-*",)
    assert Protection.parse(["*:prod-*"]).names == ("*:prod-*",)  # not a word before the colon
    with pytest.raises(ValueError, match="name:v2:prod"):  # a word: a kind, or a mistake
        Protection.parse(["v2:prod-*"])


def test_a_record_is_protected_by_id_type_status_or_name_and_says_which() -> None:
    p = Protection.parse(["id:job-1", "prod-*"], types=["SERVICE_DEPLOY"], statuses=["processing"])

    def why(**fields: object) -> str | None:
        return p.reason(JobRecord.from_api({"id": "job-9", **fields}))

    assert p.reason(JobRecord.from_api({"id": "job-1"})) == "id"
    assert why(type="SERVICE_DEPLOY") == "type SERVICE_DEPLOY"
    assert why(status="PROCESSING") == "status PROCESSING"
    assert why(name="prod-api") == "name prod-*"
    assert why(name="dev-api", status="FINISHED", type="COMMON") is None


@pytest.mark.parametrize("name", ["Prod-DB", "PROD-api", "prod-API"])
def test_a_name_rule_protects_a_name_in_any_case(name: str) -> None:
    """``prod-*`` left ``Prod-DB`` to be deleted: name rules were matched case and all. A
    rule that protects is read the way that deletes nothing by mistake (as its brackets
    are, and as id rules are in any case); discover's ``--name-glob``, which selects, stays
    case-sensitive."""
    p = Protection.parse(["prod-*"])
    assert p.reason(JobRecord.from_api({"id": "job-9", "name": name})) == "name prod-*"


def test_a_record_missing_a_field_a_rule_reads_is_protected() -> None:
    """A record with no status was deleted under ``--protected-statuses PROCESSING``: a job
    whose status we cannot see may be the one the rule is for."""
    p = Protection.parse(["prod-*"], types=["SERVICE_DEPLOY"], statuses=["PROCESSING"])
    full = {"name": "diag", "status": "FINISHED", "type": "COMMON"}

    def why(**fields: object) -> str | None:
        return p.reason(JobRecord.from_api({"id": "job-9", **fields}))

    assert why(**full) is None
    assert why(**{**full, "status": None}) == "status unknown"
    assert why(**{**full, "type": None}) == "type unknown"
    assert why(**{**full, "name": None}) == "name unknown"
    assert Protection.parse(["id:x"]).reason(JobRecord.from_api({"id": "j"})) is None
    # Spaces around a record's type or status do not hide it, and blank is unknown.
    assert why(**{**full, "status": " processing\t"}) == "status  processing\t"
    assert why(**{**full, "type": "SERVICE_DEPLOY "}) == "type SERVICE_DEPLOY "
    assert why(**{**full, "status": "  "}) == "status unknown"


def test_protect_file_rules_join_the_flag_rules_and_an_unreadable_file_is_config(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "protect.txt"
    rules.write_text(f"# keep these\nid:{UUID}\n\nprod-*   # the live ones\n", encoding="utf-8")
    p = load_protection(["id:job-1"], [rules], [], [])
    assert p.ids == {UUID, "job-1"} and p.names == ("prod-*",)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_protection([], [tmp_path / "missing.txt"], [], [])
    rules.write_text("id:not valid!\n")
    with pytest.raises(ConfigError, match="not a valid job id"):
        load_protection([], [rules], [], [])


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "is empty"), (b"\n  \n", "is empty"), (b"\xef\xbb\xbf", "is empty"),
     (b"# id:job-1\n\n   # nothing else\n", "holds only comments")],
)  # fmt: skip
def test_a_protect_file_with_no_rule_is_refused_not_taken_as_no_protection(
    tmp_path: Path, content: bytes, what: str
) -> None:
    """An empty ConfigMap mount gives a file of 0 bytes: it must not switch protection off
    without a word."""
    rules = tmp_path / "protect.txt"
    rules.write_bytes(content)
    with pytest.raises(ConfigError, match=f"protect_file {rules} {what}"):
        load_protection(["id:job-1"], [rules], [], [])


def test_a_protect_file_keeps_a_hash_inside_a_rule_and_drops_a_byte_order_mark(
    tmp_path: Path,
) -> None:
    """``name:team#1`` was cut to ``name:team``, and a file saved with a byte-order mark lost
    its first rule to it: both jobs were deleted."""
    rules = tmp_path / "protect.txt"
    rules.write_bytes("\ufeffname:prod-b\nname:team#1 # the team's\n#id:job-1\n".encode())
    p = load_protection([], [rules], [], [])
    assert p.names == ("prod-b", "team#1") and not p.ids


def test_settings_take_comma_separated_rules_from_the_environment(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REAPER_PROTECT", f"id:{UUID}, prod-*")
    monkeypatch.setenv("REAPER_PROTECTED_STATUSES", "processing")
    settings = load_settings()
    assert settings.protect == [f"id:{UUID}", "prod-*"]
    assert settings.protected_statuses == ["PROCESSING"]
    monkeypatch.setenv("REAPER_PROTECTED_TYPES", "not a type")
    with pytest.raises(ConfigError, match=r"^REAPER_PROTECTED_TYPES each entry") as refused:
        load_settings()
    assert "not a type" not in str(refused.value)


# -- the guard, in process against the simulator -------------------------------------------------


class Recorder:
    """The wrapped processor and the outcome sink: remembers what reached each."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.results: list[Result] = []

    async def delete_checked(self, batch: Batch) -> Batch:
        self.batches.append(batch)
        return Batch(batch.batch_id, ())

    async def finished(self, results: Sequence[Result]) -> None:
        self.results.extend(results)

    @property
    def passed(self) -> list[str]:
        return [i for b in self.batches for i in b.ids]


@asynccontextmanager
async def guarded(
    url: str, protection: Protection, plan: PlanCheck | None = None
) -> AsyncIterator[tuple[Guard, Recorder]]:
    async with paced_reader(url) as reader:
        recorder = Recorder()
        guard = Guard(
            inner=recorder, outcomes=recorder, protection=protection, reader=reader, plan=plan
        )
        yield guard, recorder


@pytest.mark.anyio
async def test_id_rules_cost_no_call_and_pass_the_rest_on_in_one_batch() -> None:
    async with run_simulator(SimulatorConfig(jobs=10, seed=5)) as sim:
        ids = sim.job_ids()
        async with guarded(sim.url, Protection.parse([f"id:{ids[0]}", f"id:{ids[3]}"])) as (
            guard,
            rec,
        ):
            await guard.process(Batch("b1", tuple(ids)))
        assert sim.stats.calls == 0
        assert rec.batches == [Batch("b1", tuple(i for i in ids if i not in (ids[0], ids[3])))]
        assert {(r.job_id, r.outcome, r.reason) for r in rec.results} == {
            (ids[0], Outcome.SKIPPED, "protected"),
            (ids[3], Outcome.SKIPPED, "protected"),
        }
        assert "skipped={'protected': 2}" in repr(guard)


@pytest.mark.anyio
async def test_record_rules_read_each_job_just_before_its_batch() -> None:
    async with run_simulator(SimulatorConfig(jobs=60, seed=6)) as sim:
        jobs = sim.store.jobs
        ids = sim.job_ids()
        gone = ids[-1]
        sim.store.delete([gone])
        protection = Protection.parse(["ascend-*"], statuses=["PROCESSING"])
        async with guarded(sim.url, protection) as (guard, rec):
            await guard.process(Batch("b1", tuple(ids)))
        kept = {i for i in ids[:-1] if jobs[i].status == "PROCESSING"}
        kept |= {i for i in ids[:-1] if jobs[i].name.startswith("ascend-")}
        assert kept and set(rec.passed) == set(ids[:-1]) - kept
        outcomes = {r.job_id: (r.outcome, r.reason) for r in rec.results}
        assert {i for i, o in outcomes.items() if o == (Outcome.SKIPPED, "protected")} == kept
        assert outcomes[gone][0] is Outcome.ABSENT
        assert sim.stats.show_calls == len(ids)


@pytest.mark.anyio
async def test_under_a_plan_only_planned_jobs_that_still_match_go_on() -> None:
    async with run_simulator(SimulatorConfig(jobs=20, seed=7)) as sim:
        sim.add_jobs(4, status="FINISHED")
        finished = [i for i, j in sim.store.jobs.items() if j.status == "FINISHED"]
        planned, stranger = finished[:-1], finished[-1]
        reviewed = {i: JobRecord.from_api(sim.store.jobs[i].record()) for i in planned}
        sim.set_status(planned[0], "FAILED")
        check = PlanCheck(Filters(status="FINISHED"), reviewed)
        async with guarded(sim.url, Protection(), check) as (guard, rec):
            await guard.process(Batch("b1", (*planned, stranger)))
        assert rec.passed == planned[1:]
        reasons = {r.job_id: r.reason for r in rec.results}
        assert reasons == {planned[0]: "plan_mismatch", stranger: "not_in_plan"}


# -- every path, end to end --------------------------------------------------------------------


def _outcomes(path: Path) -> dict[str, tuple[str, str | None]]:
    return {row["job_id"]: (row["outcome"], row["reason"]) for row in results(path)}


FAST = ["--yes", "--rate", "1000", "--burst", "50"]


@pytest.mark.anyio
async def test_protected_ids_survive_a_run_by_id_and_a_dry_run_without_any_read(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=50, seed=31)) as sim:
        ids = sim.job_ids()
        keep = ids[:5]
        src = write_ids(tmp_path / "ids.txt", ids)
        protect = [arg for i in keep for arg in ("--protect", i)]
        dry = tmp_path / "dry.jsonl"
        done = await reaper(["run", "-i", str(src), "--dry-run", "--results", str(dry), *protect],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        assert {i for i, o in _outcomes(dry).items() if o == ("skipped", "protected")} == set(keep)
        out = tmp_path / "results.jsonl"
        by_id = [arg for i in keep for arg in ("--protect", f"id:{i}")]  # id: rules need no read
        done = await reaper(["run", "-i", str(src), "--results", str(out), *by_id, *FAST],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        assert sim.job_ids() == keep
        assert {i for i, o in _outcomes(out).items() if o == ("skipped", "protected")} == set(keep)
        assert sim.stats.show_calls == 0 and keep[0] not in sim.sent_counts


@pytest.mark.anyio
async def test_name_patterns_types_and_statuses_protect_in_a_run_by_id(tmp_path: Path) -> None:
    """Rules from a flag, a protect file, and the environment all apply together."""
    async with run_simulator(SimulatorConfig(jobs=120, seed=32)) as sim:
        jobs = dict(sim.store.jobs)
        rules = tmp_path / "protect.txt"
        rules.write_text("# live services\nname:common-00001*\n", encoding="utf-8")
        src = write_ids(tmp_path / "ids.txt", list(jobs))
        out = tmp_path / "results.jsonl"
        env = reaper_env(sim.url, REAPER_PROTECTED_STATUSES="PROCESSING",
                         REAPER_PROTECTED_TYPES="SERVICE_DEPLOY")  # fmt: skip
        done = await reaper(
            ["run", "-i", str(src), "--results", str(out), "--protect", "ascend-diagnosis-*",
             "--protect-file", str(rules), *FAST],
            env,
        )  # fmt: skip
        assert done.code == 0, done.stderr
        keep = {i for i, j in jobs.items()
                if j.status == "PROCESSING" or j.type in ("SERVICE_DEPLOY", "ASCEND_DIAGNOSIS")
                or j.name.startswith("common-00001")}  # fmt: skip
        assert keep and len(keep) < len(jobs)
        assert set(sim.job_ids()) == keep
        assert {i for i, o in _outcomes(out).items() if o == ("skipped", "protected")} == keep
        assert not keep & set(sim.sent_counts)


@pytest.mark.anyio
async def test_a_name_rule_protects_its_names_in_any_case_in_a_run(tmp_path: Path) -> None:
    """``--protect 'prod-*'`` over a file of ids: ``Prod-DB`` and ``PROD-api`` were deleted,
    the rule matched case and all. Both end ``skipped``/``protected``, no DELETE sent for
    them; the other ids go."""
    async with run_simulator(SimulatorConfig(jobs=10, seed=34)) as sim:
        keep = [*sim.add_jobs(1, name="Prod-DB"), *sim.add_jobs(1, name="PROD-api")]
        others = [i for i in sim.job_ids() if i not in keep]
        src = write_ids(tmp_path / "ids.txt", keep + others[:3])
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "-i", str(src), "--results", str(out), "--protect",
                             "prod-*", *FAST], reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        assert set(keep) <= set(sim.job_ids()) and not set(keep) & set(sim.sent_counts)
        outcomes = _outcomes(out)
        assert all(outcomes[i] == ("skipped", "protected") for i in keep)
        assert all(outcomes[i][0] == "deleted" for i in others[:3])


UNCHECKED_NOTE = "devserver-reaper run: a dry run of ids reads no job, so "
ALL_KINDS = ["--protect", "prod-*", "--protected-types", "SERVICE_DEPLOY",
             "--protected-statuses", "PROCESSING"]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("rules", "unchecked", "said"),
    [
        (["--protect", "prod-*"], ["name"], "the name rules are"),
        (["--protected-types", "SERVICE_DEPLOY"], ["type"], "the type rules are"),
        (["--protected-statuses", "PROCESSING"], ["status"], "the status rules are"),
        (["--protect-file", "keep.txt"], ["name"], "the name rules are"),
        (ALL_KINDS, ["name", "type", "status"], "the name, type and status rules are"),
    ],
    ids=["name", "type", "status", "protect-file", "all"],
)
async def test_a_dry_run_of_ids_says_the_rules_it_cannot_check_and_its_count_an_upper_bound(
    tmp_path: Path, rules: list[str], unchecked: list[str], said: str
) -> None:
    """A dry run of ids reads no job (no credentials, no call), so name, type and status
    rules are never applied: every id was reported ``dry_run`` and counted in
    ``would_delete``, without a word, though the real run reads each job and keeps those
    the rules protect. Now ``run.summary`` names the rules in ``unchecked_rules`` (its
    ``would_delete`` an upper bound) and stderr says so once at the start; still no call, and
    no keys needed. The real run then deletes fewer than that count."""
    async with run_simulator(SimulatorConfig(jobs=6, seed=35)) as sim:
        keep = sim.add_jobs(1, name="prod-db", type="SERVICE_DEPLOY", status="PROCESSING")
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        (tmp_path / "keep.txt").write_text("name:prod-*\n", encoding="utf-8")
        env = reaper_env(sim.url)
        del env["REAPER_AK"], env["REAPER_SK"]  # a dry run of ids needs no keys
        dry = await reaper(["run", "-i", str(src), "--dry-run", *rules], env, cwd=tmp_path)
        assert dry.code == 0, dry.stderr
        summary = dry.summary()
        assert summary["unchecked_rules"] == unchecked
        assert summary["would_delete"] == len(ids)  # every id: none could be checked
        notes = [line for line in dry.stderr.splitlines() if line.startswith(UNCHECKED_NOTE)]
        assert len(notes) == 1 and notes[0].startswith(UNCHECKED_NOTE + said), dry.stderr
        assert sim.stats.calls == 0
        done = await reaper(["run", "-i", str(src), *rules, *FAST], reaper_env(sim.url),
                            cwd=tmp_path)  # fmt: skip
        assert done.code == 0, done.stderr
        assert set(keep) <= set(sim.job_ids())
        assert done.summary()["deleted"] < summary["would_delete"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("rules", "bare"), [(["--protect", "id:{0}"], False), (["--protect", "{0}"], True)]
)
async def test_a_dry_run_of_ids_under_id_rules_alone_checks_them_all(
    tmp_path: Path, rules: list[str], bare: bool
) -> None:
    """``id:ID`` rules are checked without a read: nothing is unchecked, nothing said. A
    bare id protects the name it spells too, which only a read can check: said, with the
    ``id:`` form that a dry run checks whole."""
    async with run_simulator(SimulatorConfig(jobs=5, seed=36)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        given = [rule.format(ids[0]) for rule in rules]
        dry = await reaper(["run", "-i", str(src), "--dry-run", *given], reaper_env(sim.url))
        assert dry.code == 0, dry.stderr
        summary = dry.summary()
        assert summary["unchecked_rules"] == (["name"] if bare else [])
        assert summary["would_delete"] == len(ids) - 1
        notes = [line for line in dry.stderr.splitlines() if line.startswith(UNCHECKED_NOTE)]
        assert len(notes) == (1 if bare else 0), dry.stderr
        if bare:
            assert f"id:{ids[0]} protects the id alone" in dry.stderr
        assert sim.stats.calls == 0


@pytest.mark.anyio
async def test_a_name_rule_protects_a_name_spelt_with_combining_accents(tmp_path: Path) -> None:
    """``--protect 'café-*'`` typed with one character for é protects a job the API names
    ``café-db`` with an e and a combining accent (and the other way round): the same name to
    anyone reading it. Both were deleted, and discover planned them, protection 0."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    async with run_simulator(SimulatorConfig(jobs=10, seed=33)) as sim:
        keep = [*sim.add_jobs(1, name=f"{decomposed}-db"), *sim.add_jobs(1, name=f"{composed}-x")]
        others = [i for i in sim.job_ids() if i not in keep]
        src = write_ids(tmp_path / "ids.txt", keep + others[:3])
        rules = tmp_path / "protect.txt"
        rules.write_text(f"name:{decomposed}-x\n", encoding="utf-8")
        env = reaper_env(sim.url)
        found = await reaper(["discover", "--name-regex", "(-db|-x)$", "--protect",
                              f"{composed}-*", "--protect-file", str(rules), "-o", "ids"],
                             env)  # fmt: skip
        assert found.code == 0, found.stderr
        assert not found.stdout.strip() and '"protected":2,' in found.stderr  # its summary
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "-i", str(src), "--results", str(out), "--protect",
                             f"{composed}-*", "--protect-file", str(rules), *FAST],
                            env)  # fmt: skip
        assert done.code == 0, done.stderr
        assert set(keep) <= set(sim.job_ids()) and not set(keep) & set(sim.sent_counts)
        outcomes = _outcomes(out)
        assert all(outcomes[i] == ("skipped", "protected") for i in keep)
        assert all(outcomes[i][0] == "deleted" for i in others[:3])


@pytest.mark.anyio
async def test_an_id_rule_protects_the_id_in_any_case(tmp_path: Path) -> None:
    """``--protect id:0A92...`` copied in upper case (a UUID's hex is one in either case, RFC
    4122) protects job ``0a92...``: discover planned it and a run by id deleted it. And an
    input line ``0A92...`` under ``id:0a92...`` is protected unsent, for an API that looks
    ids up without case would delete ``0a92...``."""
    async with run_simulator(SimulatorConfig(jobs=30, seed=34)) as sim:
        finished = [i for i, j in sim.store.jobs.items() if j.status == "FINISHED"]
        first, second, other = finished[:3]
        assert first.upper() != first and second.upper() != second
        env = reaper_env(sim.url)
        rules = tmp_path / "protect.txt"
        rules.write_text(f"id:{first.upper()}\n{second}\n", encoding="utf-8")
        found = await reaper(["discover", "--status", "FINISHED", "--protect-file", str(rules),
                              "-o", "ids"], env)  # fmt: skip
        assert found.code == 0, found.stderr
        listed = found.stdout.split()
        assert first not in listed and other in listed
        src = write_ids(tmp_path / "ids.txt", [first, second.upper(), other])
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "-i", str(src), "--results", str(out), "--protect-file",
                             str(rules), *FAST], env)  # fmt: skip
        assert done.code == 0, done.stderr
        outcomes = _outcomes(out)
        assert outcomes[first] == outcomes[second.upper()] == ("skipped", "protected")
        assert outcomes[other][0] == "deleted"
        assert {first, second} <= set(sim.job_ids())
        assert not {first, second.upper()} & set(sim.sent_counts)


@pytest.mark.anyio
async def test_a_blank_name_under_a_name_rule_is_protected_as_unknown(tmp_path: Path) -> None:
    """The docs say a blank field counts as none: a job the API lists with the name ``""``
    or ``"  "`` under ``--protect 'prod-*'`` may be the one the rule is for. It was deleted
    (the rule saw a name, and it did not match); now it is ``protected`` (``name unknown``),
    as a job with no name is, and a named job beside it is deleted."""
    async with run_simulator(SimulatorConfig(jobs=5, seed=35)) as sim:
        blank = [*sim.add_jobs(1, name=""), *sim.add_jobs(1, name="  ")]
        other = sim.job_ids()[0]
        src = write_ids(tmp_path / "ids.txt", [*blank, other])
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "-i", str(src), "--results", str(out), "--protect",
                             "prod-*", *FAST], reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        rows = {row["job_id"]: row for row in results(out)}
        assert all(rows[i]["outcome"] == "skipped" and rows[i]["reason"] == "protected"
                   for i in blank)  # fmt: skip
        assert rows[other]["outcome"] == "deleted"
        assert set(blank) <= set(sim.job_ids())


@pytest.mark.anyio
async def test_a_name_rule_with_brackets_protects_the_name_it_spells(tmp_path: Path) -> None:
    """``--protect 'model[1]'``, the exact name of a job, and ``name:[prod]-*`` in a protect
    file, the prefix its team tags names with: as globs alone the brackets were character
    classes (``model1``; ``p-db``), and the jobs named ``model[1]`` and ``[prod]-db`` were
    planned by discover and deleted by a run. Now each rule is also read with its brackets
    as characters."""
    async with run_simulator(SimulatorConfig(jobs=5, seed=36)) as sim:
        keep = [*sim.add_jobs(1, name="model[1]"), *sim.add_jobs(1, name="[prod]-db")]
        others = [i for i in sim.job_ids() if i not in keep]
        rules = tmp_path / "protect.txt"
        rules.write_text("name:[prod]-*\n", encoding="utf-8")
        env = reaper_env(sim.url)
        protect = ["--protect", "model[1]", "--protect-file", str(rules)]
        found = await reaper(["discover", "--name-regex", "[]]", *protect, "-o", "ids"], env)
        assert found.code == 0 and not found.stdout.strip(), found.stdout + found.stderr
        src = write_ids(tmp_path / "ids.txt", [*keep, *others])
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "-i", str(src), "--results", str(out), *protect, *FAST],
                            env)  # fmt: skip
        assert done.code == 0, done.stderr
        outcomes = _outcomes(out)
        assert all(outcomes[i] == ("skipped", "protected") for i in keep)
        assert all(outcomes[i][0] == "deleted" for i in others)
        assert set(sim.job_ids()) == set(keep)


@pytest.mark.anyio
async def test_protection_from_a_flag_adds_to_the_config_file_s_and_the_environment_s(
    tmp_path: Path,
) -> None:
    """A flag's ``--protect`` used to replace the config file's rules (and the environment's
    the file's): one extra rule on the command line deleted every job the team protected."""
    async with run_simulator(SimulatorConfig(jobs=120, seed=33)) as sim:
        jobs = dict(sim.store.jobs)
        team_file, mine = tmp_path / "team-protect.txt", tmp_path / "mine.txt"
        team_file.write_text("name:common-00002*\n", encoding="utf-8")
        mine.write_text("name:common-00003*\n", encoding="utf-8")
        config = tmp_path / "team.toml"
        config.write_text(
            'protect = ["ascend-diagnosis-*"]\nprotected_statuses = ["PROCESSING"]\n'
            f'protect_file = "{team_file}"\n',
            encoding="utf-8",
        )
        first = next(i for i, j in jobs.items() if j.status != "PROCESSING")
        env = reaper_env(sim.url, REAPER_CONFIG=str(config), REAPER_PROTECT="name:common-00001*")
        out = tmp_path / "results.jsonl"
        src = write_ids(tmp_path / "ids.txt", list(jobs))
        done = await reaper(
            ["run", "-i", str(src), "--results", str(out), "--protect", f"id:{first}",
             "--protected-statuses", "FAILED", "--protect-file", str(mine), *FAST],
            env,
        )  # fmt: skip
        assert done.code == 0, done.stderr
        keep = {i for i, j in jobs.items()
                if i == first or j.status in ("PROCESSING", "FAILED")
                or j.type == "ASCEND_DIAGNOSIS" or j.name.startswith(
                    ("common-00001", "common-00002", "common-00003"))}  # fmt: skip
        assert keep and len(keep) < len(jobs)
        assert set(sim.job_ids()) == keep
        assert {i for i, o in _outcomes(out).items() if o == ("skipped", "protected")} == keep


def test_rules_in_any_list_shape_are_read_as_rules_and_an_empty_file_name_is_refused(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``protect = ["a, b"]`` in TOML was the one name "a, b", and REAPER_PROTECT as a JSON
    list one glob: both protected nothing. An empty protect_file was quietly no file."""
    config = tmp_path / "team.toml"
    config.write_text('protect = ["prod-a, prod-b"]\n', encoding="utf-8")
    monkeypatch.setenv("REAPER_PROTECT", '["common-*", "id:job-1"]')
    assert load_settings(config).protect == ["common-*", "id:job-1", "prod-a", "prod-b"]
    for empty in ("", " "):
        with pytest.raises(ConfigError, match="--protect-file must be a file path, not empty"):
            load_settings(config, protect_file=empty)


def test_a_comma_inside_brackets_is_part_of_a_glob(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REAPER_PROTECT", "prod-[ab,c]*, id:job-1")
    assert load_settings().protect == ["prod-[ab,c]*", "id:job-1"]


@pytest.mark.anyio
async def test_protection_holds_under_a_plan_and_discover_leaves_protected_jobs_out(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=200, seed=33)) as sim:
        plan = tmp_path / "plan.json"
        env = reaper_env(sim.url)
        done = await reaper(["discover", "--status", "FINISHED", "--plan", str(plan)], env)
        assert done.code == 0, done.stderr
        from worker.discovery.plan import open_plan

        with open_plan(plan, key=None) as sealed:
            planned = list(sealed.ids())
        # Protected after the plan was made: the run must still keep them.
        late = planned[:4]
        out = tmp_path / "results.jsonl"
        protect = [arg for i in late for arg in ("--protect", f"id:{i}")]
        done = await reaper(["run", "--plan", str(plan), "--results", str(out), *protect,
                             "--protect", "common-*", *FAST], env)  # fmt: skip
        assert done.code == 0, done.stderr
        jobs_left = sim.store.jobs
        protected = {i for i, o in _outcomes(out).items() if o == ("skipped", "protected")}
        by_name = {i for i in planned if i not in late and i in jobs_left
                   and jobs_left[i].name.startswith("common-")}  # fmt: skip
        assert protected == set(late) | by_name and by_name
        assert set(planned) - protected <= sim.deleted
        # discover itself never selects a protected job.
        again = await reaper(["discover", "--all", "--protect", "common-*"], env)
        assert again.code == 0, again.stderr
        listed = again.stdout.split()
        assert listed and not any(jobs_left[i].name.startswith("common-") for i in listed)


@pytest.mark.anyio
async def test_a_config_file_s_relative_paths_are_read_beside_it_not_in_the_current_directory(
    tmp_path: Path,
) -> None:
    """``protect_file = "protect.txt"`` in a team's ``config/reaper.toml`` was read from the
    directory the run started in: run from elsewhere, a stale ``protect.txt`` there protected
    other jobs than the team's (and the keys and the ledger were looked for there too). A
    config file's relative paths are now its directory's; a flag's stay the current one's."""
    async with run_simulator(SimulatorConfig(jobs=20, seed=34)) as sim:
        ids = sim.job_ids()
        team, elsewhere = tmp_path / "team" / "config", tmp_path / "elsewhere"
        team.mkdir(parents=True)
        elsewhere.mkdir()
        rules = {"team": ids[:3], "stale": ids[3:6], "flag": ids[6:8]}
        for where, name, kept in ((team, "protect.txt", rules["team"]),
                                  (elsewhere, "protect.txt", rules["stale"]),
                                  (elsewhere, "mine.txt", rules["flag"])):  # fmt: skip
            (where / name).write_text("".join(f"id:{i}\n" for i in kept), encoding="utf-8")
        for name, key in (("ak", SIM_AK), ("sk", SIM_SK)):
            (team / "keys").mkdir(exist_ok=True)
            (team / "keys" / name).write_text(key, encoding="utf-8")
            (team / "keys" / name).chmod(0o600)
        (team / "reaper.toml").write_text(
            'protect_file = "protect.txt"\nledger = "ledger.db"\n'
            'ak_file = "keys/ak"\nsk_file = "keys/sk"\n',
            encoding="utf-8",
        )
        env = reaper_env(sim.url)
        del env["REAPER_AK"], env["REAPER_SK"]  # from the config's key files alone
        src = write_ids(tmp_path / "ids.txt", ids)
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "--config", "../team/config/reaper.toml", "-i", str(src), "--results",
             str(out), "--protect-file", "mine.txt", "--dry-run", *FAST],
            env,
            cwd=elsewhere,
        )  # fmt: skip
        assert done.code == 0, done.stderr
        protected = {i for i, o in _outcomes(out).items() if o == ("skipped", "protected")}
        assert protected == {*rules["team"], *rules["flag"]}
        assert (team / "ledger.db").is_file() and not (elsewhere / "ledger.db").exists()
        assert sim.stats.delete_calls == 0 and sim.job_ids() == ids
