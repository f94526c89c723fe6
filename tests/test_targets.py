"""Targets (issue 25): where a line's call goes, and the rules its project, region and
endpoint are held to, which are the settings' own."""

from __future__ import annotations

from ipaddress import ip_address
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from yarl import URL

from worker.settings import Settings
from worker.targets import (
    Address,
    Target,
    Targets,
    Unresolved,
    address,
    endpoint_for,
    endpoint_problem,
    misnamed_by,
    normal_endpoint,
    resolve,
)

pytestmark = pytest.mark.usefixtures("clean_env")

DEFAULT = Target("proj-a", "https://modelarts.cn-north-4.myhuaweicloud.com", "cn-north-4")
SIMULATED = Target("proj-a", "http://127.0.0.1:8001", "cn-north-4")


def test_a_line_naming_nothing_goes_to_the_default_target() -> None:
    assert resolve(Address(), DEFAULT) is DEFAULT


def test_a_project_alone_is_that_project_at_the_default_endpoint() -> None:
    assert resolve(Address(project_id="proj-b"), DEFAULT) == Target(
        "proj-b", DEFAULT.endpoint, "cn-north-4"
    )


def test_the_default_region_keeps_the_default_endpoint_an_override_included() -> None:
    """A line naming the default's region goes where the settings send it (the simulator,
    a private endpoint), not to the region's public endpoint."""
    named = Address(project_id="proj-b", region="cn-north-4")
    assert resolve(named, SIMULATED) == Target("proj-b", "http://127.0.0.1:8001", "cn-north-4")
    assert resolve(Address(region="cn-north-4"), SIMULATED) == SIMULATED


def test_another_region_goes_to_its_public_endpoint() -> None:
    named = Address(project_id="proj-b", region="ap-southeast-1")
    assert resolve(named, DEFAULT) == Target(
        "proj-b", "https://modelarts.ap-southeast-1.myhuaweicloud.cn", "ap-southeast-1"
    )


def test_an_endpoint_named_is_where_the_call_goes_the_region_its_label() -> None:
    named = Address(project_id="proj-b", region="cn-east-3", endpoint="http://127.0.0.1:9")
    assert resolve(named, DEFAULT) == Target("proj-b", "http://127.0.0.1:9", "cn-east-3")
    # the default endpoint named alone keeps the default's region as its label
    assert resolve(Address(endpoint=DEFAULT.endpoint), DEFAULT) == DEFAULT


def test_another_place_without_a_project_is_unresolved_with_a_reason() -> None:
    found = resolve(Address(region="cn-east-3"), DEFAULT)
    assert found == Unresolved(endpoint_for("cn-east-3"), "cn-east-3")
    assert isinstance(found, Unresolved)
    assert found.reason == (
        "names region cn-east-3 but no project_id (a project id belongs to one region)"
    )
    by_endpoint = resolve(Address(endpoint="http://127.0.0.1:9"), DEFAULT)
    assert isinstance(by_endpoint, Unresolved)
    assert "endpoint http://127.0.0.1:9" in by_endpoint.reason


def test_without_a_default_every_line_must_name_its_project_and_place() -> None:
    assert resolve(Address(), None) == "names no project_id and no default project is set"
    assert resolve(Address(project_id="p"), None) == (
        "names no region or endpoint and no default is set"
    )
    assert isinstance(resolve(Address(region="cn-east-3"), None), Unresolved)
    assert resolve(Address(project_id="p", region="cn-east-3"), None) == Target(
        "p", endpoint_for("cn-east-3"), "cn-east-3"
    )


def test_a_project_outside_the_allowed_list_is_refused_default_included() -> None:
    allowed = ("proj-a",)
    assert resolve(Address(project_id="proj-a"), DEFAULT, allowed=allowed) == DEFAULT
    assert resolve(Address(project_id="proj-b"), DEFAULT, allowed=allowed) == (
        "project proj-b is not in allowed_projects"
    )
    assert resolve(Address(), DEFAULT, allowed=("proj-z",)) == (
        "project proj-a is not in allowed_projects"
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"project_id": "a/b"}, "project_id must be 1 to 64 letters, digits and hyphens"),
        ({"project_id": "x" * 65}, "project_id must be 1 to 64 letters, digits and hyphens"),
        ({"region": "CN-North-4"}, "region must look like cn-north-4"),
        ({"endpoint": "ftp://x"}, "endpoint must be an http(s) URL"),
        ({"endpoint": "http://example.com"}, "endpoint plain http:// is accepted only"),
        ({"endpoint": "https://u:p@example.com"}, "endpoint must not carry a user name"),
        ({"endpoint": "https://h/?q=1"}, "endpoint must not carry a query"),
        ({"endpoint": "http://[127.0.0.1]"}, "endpoint is not a URL with a host that can be"),
        ({"endpoint": "http://[::1]x"}, "endpoint is not a URL with a host that can be read"),
    ],
)
def test_a_bad_field_is_named_with_the_rule_it_breaks(fields: dict[str, str], reason: str) -> None:
    found = address(dict(fields))
    assert isinstance(found, str)
    assert found.startswith(reason)


def test_empty_fields_are_not_named_and_an_endpoint_loses_its_slash() -> None:
    assert address({"project_id": "", "region": None}) == Address()
    assert address({"endpoint": "http://127.0.0.1:8/"}) == Address(endpoint="http://127.0.0.1:8")


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["cn-north-4", "a", "ab-c", "https://h.example", "http://127.0.0.1:80", "p-1", ""]
)


@given(_TEXT, st.sampled_from(["project_id", "region", "endpoint"]))
def test_a_line_field_is_accepted_exactly_when_the_setting_would_be(value: str, name: str) -> None:
    """One rule for both: a value the settings refuse is refused on a line, and back."""
    try:
        Settings.model_validate({name: value})
        setting_ok = True
    except ValidationError:
        setting_ok = False
    line_ok = not isinstance(address({name: value}), str)
    assert line_ok == (setting_ok or value == ""), (name, value)


_URLISH = st.builds(
    "".join,
    st.lists(
        st.sampled_from(["http://", "https://", "[", "]", "::1", "127.0.0.1", "localhost", ":",
                         "80", "@", "\\", "/", "%25", "%2f", "x", "h.example", ".", "?", "#"]),
        max_size=8,
    ),
)  # fmt: skip


@given(_URLISH)
def test_an_endpoint_accepted_is_one_the_http_client_reads_at_the_same_host(value: str) -> None:
    """The rules on trust (loopback, a public region's, the listed) read urlsplit's host; an
    endpoint they accept must be read by the HTTP client (yarl) as that host, not refused by
    it when its first call is made (a crash, every outcome lost) nor taken elsewhere."""
    if endpoint_problem(value) is not None:
        return
    kept = normal_endpoint(value)
    assert (urlsplit(kept).hostname or "") == (URL(kept).raw_host or "").lower() or (
        ip_address(urlsplit(kept).hostname or "") == ip_address(URL(kept).raw_host or "")
    ), value


def test_allowed_projects_is_a_word_list_of_project_ids_each_held_to_the_rule() -> None:
    assert Settings.model_validate(
        {"allowed_projects": "proj-a, proj-b,proj-a"}
    ).allowed_projects == [
        "proj-a",
        "proj-b",
    ]
    assert Settings(allowed_projects=["proj-a"]).allowed_projects == ["proj-a"]
    with pytest.raises(ValidationError, match="each entry must be 1 to 64 letters"):
        Settings.model_validate({"allowed_projects": "proj-a, bad/one"})


def test_a_misspelt_field_is_refused_on_every_line_however_many_clean_keys_came_before() -> None:
    """A ``misnamed_by`` check keeps the keys it found clean (one set operation a line): a key that
    spells a field otherwise is never kept, so each line naming it is refused."""
    misnamed = misnamed_by()
    reason = "names 'projectId', which is not read: the field is 'project_id'"
    assert misnamed({"id": "j1", "name": "a"}) is None
    for _ in range(2):
        assert misnamed({"id": "j1", "name": "a", "projectId": "p"}) == reason
    assert misnamed([f"key{n}" for n in range(2000)]) is None  # past what is kept
    assert (
        misnamed(["key1999", "Region"])
        == "names 'Region', which is not read: the field is 'region'"
    )


# -- one place a project (issue 25's leftovers) -----------------------------------------------


@pytest.mark.anyio
async def test_the_default_project_named_at_another_region_is_rejected_not_a_second_target() -> (
    None
):
    """A job is its project and id: the default project labelled with another region at
    the default endpoint (or at another endpoint) would be a second target, so the same id
    could be sent twice, one outcome ``deleted`` and the other ``absent``."""
    targets = Targets(SIMULATED)
    assert targets.of(Address()) is SIMULATED
    for named in (
        Address(project_id="proj-a", region="cn-east-3", endpoint=SIMULATED.endpoint),
        Address(project_id="proj-a", region="cn-east-3"),
        Address(project_id="proj-a", endpoint="http://127.0.0.1:9"),
    ):
        found = targets.of(named)
        assert isinstance(found, str), named
        assert found.startswith("names project proj-a at ")
        assert "but the settings have it at region cn-north-4, http://127.0.0.1:8001: a " \
               "project is in one region" in found  # fmt: skip
        assert await targets.find(named) == found
    # the default's own place, however it is spelt, is the default
    assert targets.of(Address(project_id="proj-a", region="cn-north-4")) == SIMULATED
    assert targets.of(Address(project_id="proj-a", endpoint=SIMULATED.endpoint)) == SIMULATED
    assert targets.met == [SIMULATED]


def test_a_project_named_at_two_places_keeps_the_first_and_rejects_the_other() -> None:
    targets = Targets(DEFAULT)
    first = targets.of(Address(project_id="proj-b", region="cn-east-3"))
    assert first == Target("proj-b", endpoint_for("cn-east-3"), "cn-east-3")
    again = targets.of(Address(project_id="proj-b", region="cn-east-3", endpoint="http://[::1]:9"))
    assert again == (
        "names project proj-b at region cn-east-3, http://[::1]:9, but a line before named it "
        "at region cn-east-3, https://modelarts.cn-east-3.myhuaweicloud.com: a project is in "
        "one region, and its ids are not sent to two places"
    )
    assert isinstance(targets.of(Address(project_id="proj-b")), str)  # the default's place
    assert targets.met == [first]


@pytest.mark.anyio
async def test_another_region_at_the_default_endpoint_without_a_project_is_its_regions() -> None:
    """Not the default project under another region's label: the region's project, from
    IAM, or rejected when there is no IAM to ask."""
    named = Address(region="cn-east-3", endpoint=SIMULATED.endpoint)
    assert resolve(named, SIMULATED) == Unresolved(SIMULATED.endpoint, "cn-east-3")

    async def lookup(region: str) -> str:
        return {"cn-east-3": "proj-east", "cn-south-1": "proj-a"}[region]

    targets = Targets(SIMULATED, lookup=lookup)
    assert await targets.find(named) == Target("proj-east", SIMULATED.endpoint, "cn-east-3")
    # IAM naming the default project for another region: one project, two places
    found = await targets.find(Address(region="cn-south-1", endpoint=SIMULATED.endpoint))
    assert isinstance(found, str) and "a project is in one region" in found


def test_an_endpoint_is_kept_in_one_normal_form_by_lines_settings_and_plans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scheme and host in lower case, the path as given without its trailing slash: the
    settings' endpoint spelt otherwise on a line is the default's place, not another one
    (which the one place a project has would reject), and a plan compares the same way."""
    monkeypatch.setenv("REAPER_ENDPOINT", "HTTP://LocalHost:8001/Proxy/")
    assert Settings().api_endpoint == "http://localhost:8001/Proxy"
    default = Target("proj-a", "http://localhost:8001/Proxy", "cn-north-4")
    named = address({"project_id": "proj-a", "endpoint": "http://LOCALHOST:8001/Proxy/"})
    assert named == Address(project_id="proj-a", endpoint="http://localhost:8001/Proxy")
    assert Targets(default).of(named) == default
    other = address({"project_id": "proj-a", "endpoint": "http://localhost:8001/proxy"})
    assert isinstance(other, Address) and isinstance(Targets(default).of(other), str)
    assert normal_endpoint("https://[::1]:9/") == "https://[::1]:9"
