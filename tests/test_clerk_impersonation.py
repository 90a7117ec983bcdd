"""Clerk impersonation, through real HTTP into the sink: a session someone else started as
the user (`actor` set: a support admin signed in as them) is not the user's login and is
left out; the user's own sessions, before and after, still are."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from handlers.clerk import handler
from tests.conftest import RunningSink
from tests.served import Served, served

FIXTURES = Path(__file__).parent / "fixtures" / "clerk"
USER = "user_2pSynthUser0000000000000001"


def fixture(name: str, **data: Any) -> dict[str, Any]:
    event: dict[str, Any] = msgspec.json.decode((FIXTURES / f"{name}.SYNTHETIC.json").read_bytes())
    event["data"].update(data)
    return copy.deepcopy(event)


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Served]:
    with served(handler, sink, tmp_path) as running:
        yield running


def test_an_impersonated_session_is_no_login_of_the_user(bridge: Served) -> None:
    own = fixture("session.created")
    impersonated = fixture("session.created.impersonated")
    assert impersonated["data"]["user_id"] == USER
    assert impersonated["data"]["actor"]["sub"] != USER
    # An actor token that names only its subject is an impersonation too.
    by_token = fixture(
        "session.created.impersonated",
        id="sess_2pSynthImpersonation00002",
        actor={"sub": "user_2pSynthAdmin000000000000001"},
    )
    later = fixture("session.created", id="sess_2pSynthSession0000000000002", actor=None)
    no_actor_field = fixture("session.created", id="sess_2pSynthSession0000000000003")
    del no_actor_field["data"]["actor"]
    empty_actor = fixture("session.created", id="sess_2pSynthSession0000000000004", actor={})
    for event in (own, impersonated, by_token, later, no_actor_field, empty_actor):
        bridge.accepted(event)
    logins = bridge.tracks(4)
    assert sorted(t["event_id"] for t in logins) == [
        "login:sess_2pSynthSession0000000000001",
        "login:sess_2pSynthSession0000000000002",
        "login:sess_2pSynthSession0000000000003",
        "login:sess_2pSynthSession0000000000004",
    ]
    assert {(t["event"], t["user_id"]) for t in logins} == {("login", USER)}
    for event in (impersonated, by_token):
        assert bridge.taken(event) == ("translated", None)  # acknowledged, not quarantined
        assert bridge.queued(event) == 0
