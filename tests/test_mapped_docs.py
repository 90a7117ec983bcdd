"""The "Without code" section of docs/handlers.md works as written: every bridge.toml in it
loads, its samples translate as it says, its error lines are the bridge's own, `map` and
`send-test` do what it shows, and the Auth0 Action, run by Node against a real bridge,
turns sign-ups and logins into calls at the local sink."""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from bridge.app import create_app
from bridge.cli import main as cli_main
from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.events import Forget, Identify, Track
from bridge.registry import Source, load_handlers, load_sources, load_templates
from bridge.testing import signed_request
from tests.conftest import RunningSink, ServerThread, free_port
from tests.test_mapped import EXAMPLE, translate

DOCS = Path(__file__).parent.parent / "docs"
SECTION = (DOCS / "handlers.md").read_text().partition("\n## Without code")[2]
ACTION = DOCS / "examples" / "auth0_action.js"
NODE = shutil.which("node")
WHSEC = "whsec_" + base64.b64encode(b"docs example secret").decode()
ENV = {
    "ACME_WEBHOOK_SECRET": "acme-secret",
    "BILLING_WEBHOOK_SECRET": WHSEC,
    "REVENUECAT_WEBHOOK_SECRET": "rc-token",
    "AUTH0_ACTIONS_WEBHOOK_SECRET": WHSEC,
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.DOTALL)


def docs_sources(tmp_path: Path, toml: str | None = None) -> dict[str, Source]:
    (tmp_path / "bridge.toml").write_text(toml if toml is not None else "\n".join(blocks("toml")))
    if not (tmp_path / "samples").exists():
        shutil.copytree(DOCS / "examples" / "samples", tmp_path / "samples")
    env = {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml"), **ENV}
    return load_sources(env, load_handlers(), templates=load_templates())


def test_the_section_shows_the_example_as_written_and_every_config_loads(tmp_path: Path) -> None:
    assert blocks("toml")[0] == EXAMPLE
    assert len(blocks("toml")) == 4
    for toml in blocks("toml"):
        assert docs_sources(tmp_path, toml)
    mapped = {n for n, s in docs_sources(tmp_path).items() if s.handler.name == "mapped"}
    assert mapped == {"acme", "billing", "revenuecat", "auth0-actions"}


def test_the_samples_become_what_the_section_says(tmp_path: Path) -> None:
    sources = docs_sources(tmp_path)

    def calls(source: str, event: str) -> list[Any]:
        body = (tmp_path / "samples" / source / f"{event}.json").read_bytes()
        variable = sources[source].secret_variable
        arrived = signed_request(sources[source].handler, body, secret=ENV[variable])
        done = translate(sources[source], body, arrived.headers)
        assert done.failure is None, done.failure
        return done.outputs

    assert sorted(sources["acme"].handler.samples()) == []  # the example names no folder
    assert sorted(sources["revenuecat"].handler.samples()) == ["INITIAL_PURCHASE", "RENEWAL"]
    (paid,) = calls("billing", "invoice.paid")
    assert isinstance(paid, Track)
    # 1500 JPY in minor units (JPY has none); an account id above 2^53, exact.
    assert paid.properties == {
        "plan": "team",
        "account": 9007199254740993,
        "amount_cents": 1500,
        "currency": "JPY",
    }
    assert paid.event_id == "purchase:in_8842"
    assert calls("billing", "account.deleted") == [Forget(user_id="u_42")]
    (first,) = calls("revenuecat", "INITIAL_PURCHASE")
    (renewal,) = calls("revenuecat", "RENEWAL")
    assert isinstance(first, Track)
    assert isinstance(renewal, Track)
    assert (first.properties["amount_cents"], first.properties["currency"]) == (499, "USD")
    assert (renewal.properties["amount_cents"], renewal.properties["currency"]) == (1525, "KWD")
    assert renewal.properties["renewal"] is True
    assert first.timestamp is not None
    assert first.timestamp.isoformat() == "2022-07-25T05:19:38.679000+00:00"
    sandbox = (
        sources["revenuecat"]
        .handler.samples()["RENEWAL"]
        .body.replace(b'"PRODUCTION"', b'"SANDBOX"')
    )
    assert translate(sources["revenuecat"], sandbox).outputs == []  # a test event
    signup = calls("auth0-actions", "user.registered")
    assert [type(c) for c in signup] == [Identify, Track]
    assert calls("auth0-actions", "user.logged_in")[0].event_id == (
        "login:auth0|6740a1b2c3d4e5f6a7b8c9d0:1"
    )


@pytest.mark.parametrize(
    ("change", "index"),
    [
        (('user_id = "payment.customer.user_id"', 'user_id = "payment.customer user_id"'), 0),
        (('track = "purchase"', 'trak = "purchase"'), 1),
        (('scheme = "hmac-sha256"', 'scheme = "hmac-sha1"'), 2),
    ],
)
def test_the_error_lines_shown_are_the_bridges(
    tmp_path: Path, change: tuple[str, str], index: int
) -> None:
    shown = [
        line
        for block in blocks("text")
        for line in block.splitlines()
        if "millimetric-bridge" in line
    ]
    with pytest.raises(ConfigError) as raised:
        docs_sources(tmp_path, EXAMPLE.replace(*change, 1))
    assert f"millimetric-bridge: {raised.value}" == shown[index]


def test_map_prints_what_the_section_shows(tmp_path: Path) -> None:
    docs_sources(tmp_path)
    sample = tmp_path / "samples" / "acme" / "payment.succeeded.json"
    env = {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml"), **ENV}
    shown = next(b for b in blocks("sh") if "millimetric-bridge map" in b).splitlines()[1:]
    result = CliRunner(env=env).invoke(cli_main, ["map", "acme", str(sample)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == shown


class Bridge:
    def __init__(self, url: str, sink: RunningSink, database: Path) -> None:
        self.url = url
        self.sink = sink
        self.database = database

    def inbox(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.database) as db:
            return db.execute("SELECT source, provider_event_id FROM inbox ORDER BY id").fetchall()


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Bridge]:
    toml = "\n".join(blocks("toml")).replace(
        'event_type = "type"\n', 'event_type = "type"\nsamples = "samples/acme"\n', 1
    )
    sources = docs_sources(tmp_path, toml)
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        **ENV,
    }
    with ServerThread(create_app(load_settings(env), sources=sources)) as server:
        yield Bridge(server.url, sink, tmp_path / "bridge.db")


def test_send_test_posts_a_mapped_sources_samples(bridge: Bridge, tmp_path: Path) -> None:
    env = {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml"), **ENV}
    runner = CliRunner(env=env)
    for event in ("user.created", "payment.succeeded", "payment.succeeded"):
        sent = runner.invoke(cli_main, ["send-test", "acme", event, "--url", bridge.url])
        assert sent.exit_code == 0, sent.output
        assert '200 {"ok":true,"result":"accepted"}' in sent.output.splitlines()
    for source, event in (("billing", "invoice.paid"), ("revenuecat", "INITIAL_PURCHASE")):
        sent = runner.invoke(cli_main, ["send-test", source, event, "--url", bridge.url])
        assert '200 {"ok":true,"result":"accepted"}' in sent.output.splitlines(), sent.output
    # Two identifies (the sign-up's, and the one learned from the acme purchases, which
    # name the visitor and the user), a sign-up and four purchases: the same acme sample
    # sent twice is two deliveries and two events.
    calls = bridge.sink.arrived(7)
    tracks = [c for c in calls if c["route"] == "track"]
    assert sorted(c["event"] for c in tracks) == ["purchase"] * 4 + ["signup"]
    assert len({c["event_id"] for c in tracks}) == 5


NODE_RUN = """
const action = require(process.argv[1]);
const [url, secret, scenario] = process.argv.slice(2);
const event = (extra) => ({
  secrets: { BRIDGE_URL: url, BRIDGE_SECRET: secret },
  user: { user_id: "auth0|6740a1b2c3d4e5f6a7b8c9d0" },
  connection: { name: "Username-Password-Authentication" },
  client: { name: "My App" },
  request: { query: {} },
  transaction: { protocol: "oidc-basic-profile" },
  stats: { logins_count: 1 },
  ...extra,
});
(async () => {
  if (scenario === "signup") {
    await action.onExecutePostUserRegistration(
      event({ request: { query: { millimetric_anonymous_id: "anon_7f3c2a91" } } }));
    await action.onExecutePostLogin(event({}));
  } else if (scenario === "not logins") {
    await action.onExecutePostLogin(
      event({ transaction: { protocol: "oauth2-refresh-token" }, stats: { logins_count: 2 } }));
    await action.onExecutePostLogin(
      event({ request: { query: { prompt: "none" } }, stats: { logins_count: 3 } }));
  } else {
    await action.onExecutePostLogin(event({ stats: { logins_count: 4 } }));
  }
  console.log("done");
})();
"""


def run_action(url: str, secret: str, scenario: str) -> str:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "-e", NODE_RUN, str(ACTION), url, secret, scenario],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_the_docs_show_the_actions_code() -> None:
    (shown,) = blocks("js")
    assert shown in ACTION.read_text()


@pytest.mark.skipif(NODE is None, reason="Node.js runs the Auth0 Action; none is installed")
def test_the_auth0_action_posts_signups_and_logins_to_the_mapped_source(bridge: Bridge) -> None:
    url = f"{bridge.url}/webhooks/auth0-actions"
    assert run_action(url, WHSEC, "signup") == "done\n"
    assert run_action(url, WHSEC, "signup") == "done\n"  # run again: the same two messages
    assert run_action(url, WHSEC, "not logins") == "done\n"
    calls = sorted(bridge.sink.arrived(3), key=lambda c: (c["route"], c.get("event", "")))
    for call in calls[1:]:  # the tracks: at the time of the Action's run
        assert call.pop("timestamp").startswith(time.strftime("%Y-", time.gmtime()))
    user = "auth0|6740a1b2c3d4e5f6a7b8c9d0"
    assert calls == [
        {
            "route": "identify",
            "user_id": user,
            "anonymous_id": "anon_7f3c2a91",
            "traits": {"connection": "Username-Password-Authentication"},
        },
        {
            "route": "track",
            "event": "login",
            "event_id": f"login:{user}:1",
            "user_id": user,
            "properties": {
                "connection": "Username-Password-Authentication",
                "client_name": "My App",
            },
        },
        {
            "route": "track",
            "event": "signup",
            "event_id": f"signup:{user}",
            "user_id": user,
            "anonymous_id": "anon_7f3c2a91",
            "properties": {"connection": "Username-Password-Authentication"},
        },
    ]
    # The second run was a redelivery of the same messages: stored once each.
    assert bridge.inbox() == [
        ("auth0-actions", f"signup:{user}"),
        ("auth0-actions", f"login:{user}:1"),
    ]
    # A wrong secret is refused and logged by the Action, which never fails the login.
    wrong = "whsec_" + base64.b64encode(b"not the secret").decode()
    assert run_action(url, wrong, "login") == "millimetric-bridge answered 401\ndone\n"
    closed = f"http://127.0.0.1:{free_port()}/webhooks/auth0-actions"
    out = run_action(closed, WHSEC, "login")
    assert out.startswith("millimetric-bridge not reached: ")
    assert out.endswith("done\n")
    time.sleep(0.3)
    assert len(httpx.get(f"{bridge.sink.url}/_sink/events").json()["events"]) == 3
