"""Auth0 logins by every current "Login - Success" code the bridge counts, through real HTTP
into the sink: native social logins (`sens`) are logins, a login whose record says it is
the user's first is also their sign-up (one per user, even beside an `ss`), and the codes
left out are left out on purpose."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from handlers.auth0 import LOGINS, TRANSLATED, handler
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "auth0"
APPLE = "apple|001234.5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c.1234"
GOOGLE = "google-oauth2|104523219874456120001"
DATABASE = "auth0|6740a1f2c3d4e5f60718293a"

# Auth0's log stream event filters (auth0.com/docs/customize/log-streams/event-filters),
# written out again: the codes of "Login - Success" and "Signup - Success".
LOGIN_SUCCESS = frozenset({"s", "scoa", "sens"})
SIGNUP_SUCCESS = frozenset({"ss"})


def logins() -> list[dict[str, Any]]:
    """sens (first), sens (later), s (first, web), scoa, ssa."""
    found: list[dict[str, Any]] = msgspec.json.decode(
        (FIXTURES / "log_stream_logins.SYNTHETIC.json").read_bytes()
    )
    return found


def signup_then_login() -> list[dict[str, Any]]:
    """The database sign-up batch: fs, ss, then the login that follows the sign-up."""
    found: list[dict[str, Any]] = msgspec.json.decode(
        (FIXTURES / "log_stream_batch.json").read_bytes()
    )
    return found


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path) as running:
        yield running


def test_the_codes_counted_are_auth0s_current_success_codes() -> None:
    assert LOGINS < LOGIN_SUCCESS  # every login counted is one Auth0 files as a login
    assert set(LOGIN_SUCCESS - LOGINS) == {"scoa"}  # a step whose /authorize logs its own `s`
    assert SIGNUP_SUCCESS | LOGINS | {"sdu"} == TRANSLATED


def test_native_social_logins_count_and_the_first_is_the_sign_up(bridge: Served) -> None:
    bridge.accepted(logins())
    calls = bridge.arrived(7)  # 2 identify, 2 signups, 3 logins
    tracks = sorted((c["event"], c["event_id"], c["user_id"]) for c in calls if c.get("event"))
    assert tracks == [
        ("login", "login:auth0:90020261201090000000000000000000000000000000000000000001", APPLE),
        ("login", "login:auth0:90020261201100000000000000000000000000000000000000000003", GOOGLE),
        ("login", "login:auth0:90020261208090000000000000000000000000000000000000000002", APPLE),
        ("signup", f"signup:auth0:{APPLE}", APPLE),
        ("signup", f"signup:auth0:{GOOGLE}", GOOGLE),
    ]
    identifies = sorted(
        (c["user_id"], c["traits"]["strategy"]) for c in calls if c["route"] == "identify"
    )
    assert identifies == [(APPLE, "apple"), (GOOGLE, "google-oauth2")]
    (apple_signup,) = [c for c in calls if c.get("event_id") == f"signup:auth0:{APPLE}"]
    assert apple_signup["timestamp"] == "2026-12-01T09:00:00.250000Z"
    assert apple_signup["properties"] == {
        "connection": "apple",
        "strategy": "apple",
        "client_id": "nT5cG1hJ8kL2mP4qR7sV0wX3",
        "client_name": "Acme iOS",
    }
    # Nothing of the scoa and ssa records, and no IP, user agent or e-mail, left the bridge.
    wire = msgspec.json.encode(calls)
    for private in (b"198.51.100.23", b"CFNetwork", b"robin@example.org", b"scoa", b"ssa"):
        assert private not in wire


def test_a_sign_up_and_the_first_login_after_it_are_one_sign_up(bridge: Served) -> None:
    fs, ss, s = signup_then_login()
    first = copy.deepcopy(s)
    first["data"]["details"]["prompts"] = [
        {"name": "prompt-signup", "stats": {"loginsCount": 1}},
        {"name": "login", "user_id": DATABASE},
    ]
    # Auth0 may send them in one batch or two, in either order.
    bridge.accepted([first])
    bridge.accepted([fs, ss])
    calls = bridge.arrived(3)
    signups = [c for c in calls if c.get("event") == "signup"]
    assert [c["event_id"] for c in signups] == [f"signup:auth0:{DATABASE}"]
    assert [c["event"] for c in calls if c["route"] == "track"].count("login") == 1
    assert bridge.queued([fs, ss]) == 1  # its identify; its signup is the one already queued
    stats = httpx.get(f"{bridge.sink.url}/_sink/stats").json()
    assert stats["duplicates"] == 0


def test_a_later_or_uncounted_login_is_a_login_only(bridge: Served) -> None:
    _, later, web, _, _ = logins()
    odd = copy.deepcopy(web)
    odd["log_id"] = odd["data"]["log_id"] = "900" + "0" * 52 + "7"
    odd["data"]["details"] = {"prompts": "not a list", "stats": {"loginsCount": "1"}}
    bare = copy.deepcopy(later)
    bare["log_id"] = bare["data"]["log_id"] = "900" + "0" * 52 + "8"
    del bare["data"]["details"]
    bridge.accepted([later, odd, bare])
    tracks = bridge.tracks(3)
    assert sorted(t["event"] for t in tracks) == ["login", "login", "login"]
    assert bridge.queued([later, odd, bare]) == 3  # all three records read, none skipped
