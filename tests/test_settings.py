"""Settings: where each value comes from, what is refused, and that secrets never show.

Precedence, most specific first: flags, ``REAPER_*``, ``HUAWEICLOUD_SDK_*``, the TOML config
file (``--config``, else ``REAPER_CONFIG``), defaults. A secret read from a file counts at
the level where the file was named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import pytest

from worker.api.secrets import SECRET_FILE_LIMIT
from worker.errors import ConfigError
from worker.settings import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    PATH_SETTINGS,
    SDK_ENVIRONMENT,
    Settings,
    load_settings,
)
from worker.targets import endpoint_for

pytestmark = pytest.mark.usefixtures("clean_env")

CANARY = "CANARY-s3cr3t-7f1e9b"


def toml(tmp_path: Path, text: str, name: str = "reaper.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> str:
    """The message of the ConfigError that load_settings raises for these arguments."""
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# -- precedence ------------------------------------------------------------------------


def test_defaults_with_nothing_set() -> None:
    settings = load_settings()
    assert settings.batch_size == DEFAULT_BATCH_SIZE
    assert (settings.concurrency, settings.rate, settings.burst) == (8, 10.0, 5)
    assert settings.sk is None
    assert settings.dry_run is False


@pytest.mark.parametrize(
    ("given", "rate"), [(" auto", "auto"), ("AUTO ", "auto"), (" 12.5 ", 12.5)]
)
def test_rate_takes_auto_in_any_case_and_spaces_around(given: str, rate: object) -> None:
    assert load_settings(rate=given).rate == rate
    with pytest.raises(ConfigError, match="rate"):
        load_settings(rate="au to")


def test_flag_beats_env_beats_config_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = toml(tmp_path, "batch_size = 7\nconcurrency = 3\nrate = 2.5\n")
    monkeypatch.setenv("REAPER_BATCH_SIZE", "8")
    monkeypatch.setenv("REAPER_CONCURRENCY", "4")

    settings = load_settings(config, batch_size=9)
    assert settings.batch_size == 9  # flag over env
    assert settings.concurrency == 4  # env over file
    assert settings.rate == 2.5  # file over default
    assert settings.burst == 5  # default

    monkeypatch.delenv("REAPER_BATCH_SIZE")
    assert load_settings(config).batch_size == 7
    assert load_settings(config, batch_size=None).batch_size == 7  # None = flag not given


def test_reaper_config_names_the_file_and_another_config_flag_beside_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag used to win and REAPER_CONFIG's file was dropped unsaid, its protection
    rules with it (issue 20): now two files named is 78, and one named twice is read."""
    from_env = toml(tmp_path, "batch_size = 11\n", "env.toml")
    from_flag = toml(tmp_path, "batch_size = 12\n", "flag.toml")
    monkeypatch.setenv("REAPER_CONFIG", str(from_env))
    assert load_settings().batch_size == 11
    assert load_settings(from_env).batch_size == 11
    with pytest.raises(ConfigError, match="two config files"):
        load_settings(from_flag)


@pytest.mark.parametrize("via_env", [False, True], ids=["--config", "REAPER_CONFIG"])
def test_a_named_config_file_that_is_not_there_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_env: bool
) -> None:
    missing = tmp_path / "nowhere.toml"
    if via_env:
        monkeypatch.setenv("REAPER_CONFIG", str(missing))
        message = config_error()
    else:
        message = config_error(config=missing)
    assert str(missing) in message
    assert ("REAPER_CONFIG" in message) == via_env


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    message = config_error(config=toml(tmp_path, "batch_sise = 3\n"))
    assert "batch_sise" in message


@pytest.mark.parametrize(("variable", "field"), sorted(SDK_ENVIRONMENT.items()))
def test_the_sdk_variables_are_honoured_below_reaper_and_above_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, field: str
) -> None:
    """HUAWEICLOUD_SDK_X is used; REAPER_X, more specific, wins; the config file loses."""

    def value(settings: Settings) -> str | None:
        got = getattr(settings, field)
        return got if got is None or isinstance(got, str) else got.get_secret_value()

    file, sdk, ours, flag = (
        [f"https://iam.{region}.example" for region in ("file", "sdk", "ours", "flag")]
        if field == "iam_endpoint"
        else ["cn-south-1", "cn-north-4", "cn-east-3", "ap-southeast-1"]
    )
    config = toml(tmp_path, f'{field} = "{file}"\n')
    monkeypatch.setenv(variable, sdk)
    assert value(load_settings(config)) == sdk
    monkeypatch.setenv("REAPER_" + field.upper(), ours)
    assert value(load_settings(config)) == ours
    assert value(load_settings(config, **{field: flag})) == flag


def test_reaper_yes_true_is_yes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAPER_YES", "true")
    monkeypatch.setenv("REAPER_DRY_RUN", "1")
    settings = load_settings()
    assert settings.yes is True
    assert settings.dry_run is True


# -- secrets from files ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ak", "sk", "security_token"])
def test_a_secret_is_read_from_its_file_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    value = "CANARYAK7F1E9B" if name == "ak" else CANARY  # an access key has its own shape
    secret = tmp_path / name
    secret.write_text(f"  {value}\n", encoding="utf-8")
    secret.chmod(0o600)
    monkeypatch.setenv(f"REAPER_{name.upper()}_FILE", str(secret))
    settings = load_settings()
    got = getattr(settings, name)
    assert (got if isinstance(got, str) else got.get_secret_value()) == value
    assert settings.secret_files == {name: secret}  # remembered, to be read again on rotation
    assert settings.warnings == ()


def test_a_secret_file_counts_where_it_was_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--sk beats REAPER_SK_FILE; REAPER_SK_FILE beats HUAWEICLOUD_SDK_SK and the file's sk;
    a config file's sk_file beats its default."""
    secret = tmp_path / "sk"
    secret.write_text("from-file\n", encoding="utf-8")

    def sk(**kwargs: object) -> str:
        found = load_settings(**kwargs).sk  # type: ignore[arg-type]
        assert found is not None
        return found.get_secret_value()

    config = toml(tmp_path, 'sk = "from-config"\n')
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", "from-sdk-env")
    monkeypatch.setenv("REAPER_SK_FILE", str(secret))
    assert sk(config=config) == "from-file"
    assert sk(config=config, sk="from-flag") == "from-flag"
    monkeypatch.delenv("REAPER_SK_FILE")
    monkeypatch.delenv("HUAWEICLOUD_SDK_SK")
    other = toml(tmp_path, f'sk_file = "{secret}"\n', "other.toml")
    assert sk(config=other) == "from-file"


def test_a_secret_file_below_the_flag_that_decides_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--sk decides, so a broken REAPER_SK_FILE under it no longer fails the run (78);
    without the flag, the broken file is still an error."""
    monkeypatch.setenv("REAPER_SK_FILE", str(tmp_path / "missing"))
    settings = load_settings(sk="from-flag")
    assert settings.sk is not None and settings.sk.get_secret_value() == "from-flag"
    assert config_error().startswith("REAPER_SK_FILE ")  # named as given


def test_at_one_level_the_secret_file_wins_over_the_value_beside_it(tmp_path: Path) -> None:
    secret = tmp_path / "sk"
    secret.write_text("from-file", encoding="utf-8")
    config = toml(tmp_path, f'sk = "{CANARY}"\nsk_file = "{secret}"\n')
    for settings in (load_settings(sk=CANARY, sk_file=str(secret)), load_settings(config)):
        assert settings.sk is not None
        assert settings.sk.get_secret_value() == "from-file"


def _unreadable(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"secret-{kind}"
    if kind == "directory":
        path.mkdir()
        return path, "is not a regular file"
    if kind == "missing":
        return path, "cannot be read"
    if kind == "not-utf8":
        path.write_bytes(b"\xff\xfe" + CANARY.encode() + b"\xc3")
        return path, "not UTF-8"
    if kind == "empty":
        path.write_text(" \n", encoding="utf-8")
        return path, "is empty"
    path.write_text(CANARY * (SECRET_FILE_LIMIT // len(CANARY) + 1), encoding="utf-8")
    return path, "larger than"


@pytest.mark.parametrize("kind", ["directory", "missing", "not-utf8", "empty", "huge"])
@pytest.mark.parametrize("name", ["sk_file", "security_token_file"])
def test_an_unusable_secret_file_is_a_config_error_that_quotes_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, name: str
) -> None:
    path, reason = _unreadable(tmp_path, kind)
    monkeypatch.setenv("REAPER_SK", CANARY)  # a secret that is set elsewhere must not leak
    message = config_error(**{name: str(path)})
    assert message.startswith("--" + name.replace("_", "-"))  # given as a flag: named so
    assert str(path) in message
    assert reason in message
    assert CANARY not in message


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["a", "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "my-project-1", "x" * 64]
)
def test_a_valid_project_id_is_kept(good: str) -> None:
    assert load_settings(project_id=good).project_id == good


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "has_underscore", "has space", "dot.ted", "项目", "abc\n", "a/b"]
)
def test_an_invalid_project_id_is_refused_without_echoing_it(bad: str) -> None:
    message = config_error(project_id=bad)
    assert "--project-id" in message  # named as it was given: a flag
    if bad:
        assert bad not in message


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("cn-north-4", "https://modelarts.cn-north-4.myhuaweicloud.com"),
        ("ap-southeast-1", "https://modelarts.ap-southeast-1.myhuaweicloud.cn"),
        ("ap-southeast-3", "https://modelarts.ap-southeast-3.myhuaweicloud.com"),
        ("sa-brazil-1", "https://modelarts.sa-brazil-1.myhuaweicloud.com"),
    ],
)
def test_the_endpoint_follows_the_region(region: str, endpoint: str) -> None:
    assert load_settings(region=region).api_endpoint == endpoint
    assert endpoint_for(region) == endpoint


def test_an_explicit_endpoint_beats_the_region_and_loses_its_trailing_slash() -> None:
    settings = load_settings(region="cn-north-4", endpoint="https://proxy.example.com:8443/")
    assert settings.api_endpoint == "https://proxy.example.com:8443"


def test_without_endpoint_or_region_the_api_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="endpoint or region"):
        _ = load_settings().api_endpoint


@pytest.mark.parametrize("bad", ["cn-nörth-4", "CN-NORTH-4", "cn_north_4", "north", "cn-", ""])
def test_an_invalid_region_is_refused(bad: str) -> None:
    assert "region" in config_error(region=bad)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8443",
        "http://127.5.6.7",
        "http://[::1]:9000",
        "http://localhost:8080",
        "https://modelarts.cn-north-4.myhuaweicloud.com",
        "https://10.0.0.1",
    ],
)
def test_https_anywhere_and_plain_http_on_loopback_are_accepted(url: str) -> None:
    assert load_settings(endpoint=url).endpoint == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://modelarts.cn-north-4.myhuaweicloud.com", "loopback"),
        ("http://10.0.0.1:8443", "loopback"),
        ("http://0.0.0.0:8443", "loopback"),
        ("http://127.0.0.1.nip.io", "loopback"),
        ("ftp://127.0.0.1", "http(s) URL"),
        ("modelarts.cn-north-4.myhuaweicloud.com", "http(s) URL"),
        ("https://", "http(s) URL"),
        ("https://host.example/?x=1", "query"),
        ("https://host.example:99999", "port"),
        ("https://exa mple.com", "spaces"),  # went on to a DNS failure: 69, not 78
        ("https://example.com/\x1b[2J", "control characters"),
    ],
)
def test_an_unsafe_or_malformed_endpoint_is_refused(url: str, reason: str) -> None:
    message = config_error(endpoint=url)
    assert "endpoint" in message
    assert reason in message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"redis://:{CANARY}@127.0.0.1:6379/abc", "database must be a number"),
        ("redis://127.0.0.1:6379/0?db=one", "database must be a number"),
        ("redis://127.0.0.1:6379/٣", "database must be a number"),  # a digit, not ASCII
        (f"http://:{CANARY}@127.0.0.1:6379/0", "redis://"),
        ("redis://127.0.0.1:99999/0", "port"),
    ],
)
def test_a_redis_url_redis_py_would_misread_is_refused_without_echoing_it(
    url: str, reason: str
) -> None:
    """redis-py reads a database it cannot parse as database 0: work would go to the wrong
    database, silently."""
    message = config_error(redis_url=url)
    assert "--redis-url" in message and reason in message
    assert CANARY not in message


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "rediss://r.example:6380/15",
     "redis://127.0.0.1/3?db=3", "unix:///run/redis.sock?db=2"],
)  # fmt: skip
def test_redis_urls_in_every_documented_shape_are_accepted(url: str) -> None:
    assert load_settings(redis_url=url).redis_url == url


def test_an_endpoint_with_a_password_is_refused_without_echoing_it() -> None:
    message = config_error(endpoint=f"https://user:{CANARY}@modelarts.example.com")
    assert "user name or password" in message
    assert CANARY not in message


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("batch_size", [1, MAX_BATCH_SIZE], [0, -1, MAX_BATCH_SIZE + 1]),
        ("concurrency", [1, 256], [0, 257]),
        ("rate", [0.01, 10_000], [0, -1, 10_000.5, float("nan")]),
        ("burst", [1], [0]),
        ("max_attempts", [1, 50], [0, 51]),
        ("http_port", [0, 65535], [-1, 65536]),
        ("deadline", [0.5], [0, -3]),
    ],
)
def test_numbers_are_bounded(field: str, good: list[float], bad: list[float]) -> None:
    for value in good:
        given: dict[str, Any] = {field: value}
        assert getattr(load_settings(**given), field) == value
    for value in bad:
        assert f"--{field.replace('_', '-')}" in config_error(**{field: value})


def test_the_retry_s_base_delay_is_a_setting_in_seconds_bounded_as_its_cap_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``retry_base_delay`` (the tests shorten it) reaches the retry policy, 0.5 s
    unless set; 0 (no back-off: a failing API called again at once) and past the 30 s cap
    are refused in seconds."""
    from worker import wiring

    assert wiring.retry_policy(load_settings()).base_delay == 0.5
    monkeypatch.setenv("REAPER_RETRY_BASE_DELAY", "0.02")
    assert wiring.retry_policy(load_settings()).base_delay == 0.02
    for bad, said in (("0", "more than 0 seconds"), ("31", "at most 30 seconds")):
        monkeypatch.setenv("REAPER_RETRY_BASE_DELAY", bad)
        assert config_error() == (
            f"retry_base_delay (REAPER_RETRY_BASE_DELAY or the config file) must be {said}, "
            f"not {bad}"
        )


@pytest.mark.anyio
async def test_serve_s_redis_timeout_is_a_setting_past_its_read_s_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``redis_timeout`` (the tests shorten it) is how long both of serve's Redis
    clients wait for an answer past the read's block, 10 s unless set; 0 is refused."""
    from contextlib import AsyncExitStack

    from worker.assembly import build_service_redis
    from worker.service.service import ServiceConfig

    for given, waited in ((None, 11.0), ("2", 3.0)):
        if given is not None:
            monkeypatch.setenv("REAPER_REDIS_TIMEOUT", given)
        async with AsyncExitStack() as stack:
            config = ServiceConfig(batch_size=1, concurrency=1, max_deliveries=1,
                                   reclaim_after=60.0, grace=1.0, block=1.0)  # fmt: skip
            clients = build_service_redis(stack, load_settings(), config)
            timeouts = {c.connection_pool.connection_kwargs["socket_timeout"] for c in clients}
        assert timeouts == {waited}
    monkeypatch.setenv("REAPER_REDIS_TIMEOUT", "0")
    named = "redis_timeout (REAPER_REDIS_TIMEOUT or the config file)"
    assert config_error() == f"{named} must be more than 0 seconds, not 0"


def test_bounds_apply_to_environment_strings_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAPER_BATCH_SIZE", "5000")
    assert "batch_size" in config_error()
    monkeypatch.setenv("REAPER_BATCH_SIZE", "many")
    assert "batch_size" in config_error()


# -- secrets never show -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"sk = {{ value = '{CANARY}' }}\n",
        f"security_token = ['{CANARY}']\n",
        "sk = 9876543210123\n",
        f"sk = {CANARY}\n",
        f'sk = "{CANARY}\n',
        f"sk = '''{CANARY}",
    ],
    ids=["table", "list", "number", "bare-word", "unterminated", "unterminated-multiline"],
)
def test_an_invalid_secret_in_the_config_file_is_named_but_not_shown(
    tmp_path: Path, text: str
) -> None:
    """The secret itself is the invalid input (a non-string, or broken TOML around it)."""
    message = config_error(config=toml(tmp_path, text))
    assert "sk" in message or "security_token" in message or "TOML" in message
    assert CANARY not in message
    assert "9876543210123" not in message


def test_a_validation_error_elsewhere_does_not_echo_the_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REAPER_SK", CANARY)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SECURITY_TOKEN", CANARY + "-token")
    with pytest.raises(ConfigError) as caught:
        load_settings(batch_size=0, project_id="bad id")
    for text in (str(caught.value), repr(caught.value)):
        assert "--batch-size" in text
        assert "--project-id" in text
        assert CANARY not in text


def test_repr_str_and_dump_never_show_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAPER_SECURITY_TOKEN", CANARY + "-token")
    settings = load_settings(sk=CANARY, ak="AKIDPUBLIC", project_id="p1", region="cn-north-4")
    assert settings.sk is not None
    assert settings.sk.get_secret_value() == CANARY
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert CANARY not in text
        assert "**********" in text


def test_require_api_names_what_is_missing_not_what_is_set() -> None:
    """With keys pinned to the settings, a missing AK is named; the secret never is."""
    with pytest.raises(ConfigError) as caught:
        load_settings(sk=CANARY, region="cn-north-4", credential_source="settings").require_api()
    message = str(caught.value)
    assert "--ak" in message
    assert "--sk" not in message
    assert CANARY not in message
    load_settings(sk=CANARY, ak="DEMOAK", project_id="p1", region="cn-north-4").require_api()


def test_require_api_leaves_keys_to_the_credential_chain_by_default() -> None:
    """Keys may come from a profile, pod identity or metadata: not required up front."""
    load_settings(region="cn-north-4").require_api()
    with pytest.raises(ConfigError, match="endpoint or region"):
        load_settings().require_api()


# -- issue 24: where keys come from, checked ------------------------------------------------


def test_the_sdk_region_variable_is_not_read_as_the_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the SDK, ``HUAWEICLOUD_SDK_REGION`` prefixes endpoint overrides; it names no region."""
    monkeypatch.setenv("HUAWEICLOUD_SDK_REGION", "cn-north-4")
    assert load_settings().region is None


def test_the_sdk_keys_are_a_source_of_their_own_not_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``REAPER_AK`` beside ``HUAWEICLOUD_SDK_SK`` no longer makes one mismatched pair."""
    monkeypatch.setenv("REAPER_AK", "REAPERAK")
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", CANARY)
    monkeypatch.setenv("HUAWEICLOUD_SDK_SECURITY_TOKEN", CANARY)
    settings = load_settings()
    assert (settings.ak, settings.sk, settings.security_token) == ("REAPERAK", None, None)


def test_a_fifo_as_a_key_file_fails_at_once_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "sk"
    os.mkfifo(fifo)
    assert "is not a regular file" in config_error(sk_file=str(fifo))


@pytest.mark.parametrize(("mode", "group", "warned"), [
    (0o600, "ours", False), (0o640, "ours", False), (0o640, "theirs", True),
    (0o604, "ours", True), (0o644, "ours", True),
])  # fmt: skip
def test_a_key_file_others_can_read_is_warned_about_as_ssh_does(
    tmp_path: Path, mode: int, group: str, warned: bool
) -> None:
    """Readable by a group we are in is fine (``fsGroup`` makes a mounted Secret 0440)."""
    secret = tmp_path / "sk"
    secret.write_text(CANARY)
    if group == "theirs":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another group")
        os.chown(secret, -1, 65534)
    secret.chmod(mode)
    settings = load_settings(sk_file=str(secret))
    assert bool(settings.warnings) == warned
    for warning in settings.warnings:
        assert "readable by others" in warning and str(secret) in warning
        assert CANARY not in warning


def test_an_ak_file_pointed_at_another_file_is_refused_not_sent(tmp_path: Path) -> None:
    """The secret key's file, or any file, given as ``ak_file``: refused by its shape; the
    content is never repeated."""
    wrong = tmp_path / "sk-by-mistake"
    wrong.write_text("Zx9" * 13 + "Q\n")  # 40 characters: a secret key
    message = config_error(ak_file=str(wrong))
    assert "is not an access key" in message and "ak" in message
    assert "Zx9" not in message
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert "is not an access key" in config_error(ak_file=str(passwd))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [("http://169.254.169.254", True), ("https://meta.example", True),
     ("http://127.0.0.1:9000", True), ("http://meta.example", False), ("http://10.1.2.3", False)],
)  # fmt: skip
def test_metadata_url_is_link_local_loopback_or_https(url: str, allowed: bool) -> None:
    if allowed:
        assert load_settings(metadata_url=url).metadata_url == url
    else:
        assert "link-local or loopback" in config_error(metadata_url=url)


def test_two_config_files_at_once_are_refused_never_one_dropped(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config before and after the command, or REAPER_CONFIG and --config: one was read
    and the other dropped without a word, its protection rules with it."""
    import subprocess
    import sys

    team, mine = tmp_path / "team.toml", tmp_path / "mine.toml"
    team.write_text('protected_statuses = ["PROCESSING"]\n')
    mine.write_text("rate = 5\n")
    argv = [sys.executable, "-m", "worker", "--config", str(team), "check", "--config", str(mine)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 78 and "two config files" in done.stderr
    env = {**os.environ, "REAPER_CONFIG": str(team)}
    done = subprocess.run([sys.executable, "-m", "worker", "check", "--config", str(mine)],
                          capture_output=True, text=True, check=False, env=env)  # fmt: skip
    assert done.returncode == 78 and "REAPER_CONFIG" in done.stderr
    monkeypatch.setenv("REAPER_CONFIG", str(team))
    with pytest.raises(ConfigError, match="two config files"):
        load_settings(mine)
    assert load_settings(team).protected_statuses == ["PROCESSING"]  # the same one: read


def test_every_path_in_a_config_file_is_its_directory_s_and_a_flag_s_the_current_one_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each path-valued setting given relative in the config file is taken from the file's
    directory (it was taken from wherever the command ran); one given by a flag or a
    ``REAPER_*`` variable stays relative to the current directory, and an absolute one and
    an empty one are as they were."""
    team, elsewhere = tmp_path / "team", tmp_path / "elsewhere"
    team.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = {name: f"sub/{name}.x" for name in PATH_SETTINGS if not name.endswith("_file")}
    relative |= {"protect_file": "protect.txt", "plan_key_file": "../keys/plan.key"}
    config = toml(team, "".join(f'{name} = "{value}"\n' for name, value in relative.items()))
    settings = load_settings(f"../team/{config.name}")
    for name, value in relative.items():
        if name != "protect_file":
            assert getattr(settings, name).resolve() == (team / value).resolve(), name
    assert [p.resolve() for p in settings.protect_files] == [team / "protect.txt"]
    monkeypatch.setenv("REAPER_LEDGER", "mine.db")
    given = load_settings(config, protect_file="mine.txt")
    assert given.ledger == Path("mine.db")
    assert given.protect_files == (Path("mine.txt"), team / "protect.txt")
    monkeypatch.delenv("REAPER_LEDGER")
    absolute = toml(team, f'ledger = "{tmp_path / "l.db"}"\n', name="abs.toml")
    assert load_settings(absolute).ledger == tmp_path / "l.db"
    empty = toml(team, 'ledger = ""\n', name="empty.toml")
    assert "must be a file path, not empty" in config_error(config=empty)
    assert set(PATH_SETTINGS) >= {"ak_file", "sk_file", "security_token_file", "ca_bundle",
                                  "ledger", "protect_file", "plan_key_file"}  # fmt: skip


@pytest.mark.parametrize("given", ["inf", "-inf", "nan"])
def test_no_number_setting_takes_an_infinity_or_a_nan(
    given: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every setting that is a number refuses ``inf`` and ``nan`` whatever its limits (an
    upper one refused ``inf`` already; ``deadline``, ``reclaim_after``, the retention ages and
    ``stats_interval`` have none), naming the setting and what it must be."""
    numbers = [name for name, field in Settings.model_fields.items()
               if {int, float} & {field.annotation, *get_args(field.annotation)}]  # fmt: skip
    assert {"deadline", "rate", "batch_size", "max_fraction", "stats_interval"} <= {
        *numbers, "rate"}  # fmt: skip
    for name in [*numbers, "rate"]:
        monkeypatch.setenv(f"REAPER_{name.upper()}", given)
        said = config_error()
        monkeypatch.delenv(f"REAPER_{name.upper()}")
        assert said.startswith(f"{name} (REAPER_{name.upper()} or the config file) must be "), said
        assert said.endswith(f", not {given}"), said
