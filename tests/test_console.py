"""The operator's console over plain HTTP: signing in, the session cookie, CSRF, the
throttle, and each page against a real bridge and the real local sink.

What a browser makes of the pages is in test_console_browser.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import msgspec
import pytest
import stripe
from structlog.testing import capture_logs

from bridge.console.session import SESSION_SECONDS, Keys, Throttle
from handlers.stripe import StripeHandler
from tests.conftest import RunningSink, ServerThread
from tests.test_operations import FIXTURE, SECRET, metric, serve, signed_checkout

TOKEN = "console-token-0123456789abcdef"


class Console:
    """A browser's view of the console, as plain HTTP: its cookies, and the CSRF token of
    the last page it read."""

    def __init__(self, url: str, **headers: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, follow_redirects=False)
        self.csrf = ""

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        answer = self.http.get(path, headers=headers)
        found = re.search(r'name="_csrf" value="([^"]+)"', answer.text)
        if found:
            self.csrf = found.group(1)
        return answer

    def post(self, path: str, data: dict[str, str], **headers: str) -> httpx.Response:
        answer = self.http.post(path, data={"_csrf": self.csrf, **data}, headers=headers)
        found = re.search(r'name="_csrf" value="([^"]+)"', answer.text)
        if found:
            self.csrf = found.group(1)
        return answer

    def sign_in(self, token: str = TOKEN, **headers: str) -> httpx.Response:
        self.get("/console/sign-in")
        return self.post("/console/sign-in", {"token": token}, **headers)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN) as server:
        yield server


@pytest.fixture
def console(bridge: ServerThread) -> Iterator[Console]:
    with Console(bridge.url) as signed_in:
        assert signed_in.sign_in().status_code == 303
        yield signed_in


def send_checkout(bridge: ServerThread) -> None:
    body, headers = signed_checkout()
    assert httpx.post(f"{bridge.url}/webhooks/stripe", content=body, headers=headers).is_success


def wait_for(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_console_is_not_there_without_an_admin_token(sink: RunningSink, tmp_path: Path) -> None:
    with serve(sink, tmp_path) as bridge:
        for path in ("/console", "/console/sign-in", "/console/static/console.css"):
            assert httpx.get(f"{bridge.url}{path}").status_code == 404
        assert httpx.post(f"{bridge.url}/console/sign-in", data={"token": "x"}).status_code in (
            404,
            405,
        )


def test_signed_out_pages_lead_to_sign_in(bridge: ServerThread) -> None:
    with Console(bridge.url) as visitor:
        signed_out_pages(visitor)


def signed_out_pages(visitor: Console) -> None:
    for path in ("/console", "/console/deliveries", "/console/deliveries/1", "/console/dead"):
        answer = visitor.get(path)
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in")
    refresh = visitor.get("/console/panel", headers={"hx-request": "true"})
    assert (refresh.status_code, refresh.headers["hx-redirect"]) == (401, "/console/sign-in")
    visitor.get("/console/sign-in")
    refused = visitor.post("/console/forget/confirm", {"user_id": "user_ops"})
    assert refused.status_code == 401
    assert "Signed out" in refused.text
    # The static files are public: nothing in them is private.
    assert visitor.get("/console/static/htmx.min.js").status_code == 200


def test_signing_in_sets_a_strict_http_only_session_cookie(bridge: ServerThread) -> None:
    with Console(bridge.url) as visitor:
        session_cookie(visitor)


def session_cookie(visitor: Console) -> None:
    page = visitor.get("/console/sign-in")
    assert page.status_code == 200
    assert TOKEN not in page.text
    answer = visitor.sign_in()
    assert (answer.status_code, answer.headers["location"]) == (303, "/console")
    session = next(c for c in answer.headers.get_list("set-cookie") if "bridge_console=" in c)
    attributes = {part.strip().lower() for part in session.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console", f"max-age={SESSION_SECONDS}"} <= (
        attributes
    )
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    assert TOKEN not in session
    overview = visitor.get("/console")
    assert overview.status_code == 200
    assert "<title>Overview · millimetric-bridge</title>" in overview.text
    assert TOKEN not in overview.text
    for header in ("content-security-policy", "referrer-policy", "x-content-type-options"):
        assert header in overview.headers
    assert overview.headers["cache-control"] == "no-store"

    signed_out = visitor.post("/console/sign-out", {})
    assert signed_out.status_code == 303
    assert "Max-Age=0" in signed_out.headers["set-cookie"]
    visitor.http.cookies.delete("bridge_console")
    assert visitor.get("/console").status_code == 303


def test_behind_an_https_proxy_the_cookies_are_secure(bridge: ServerThread) -> None:
    proxied = {"x-forwarded-proto": "https"}
    page = httpx.get(f"{bridge.url}/console/sign-in", headers=proxied)
    csrf_cookie = page.headers["set-cookie"]
    assert "secure" in csrf_cookie.lower()
    nonce = csrf_cookie.split(";")[0]
    (token,) = re.findall(r'name="_csrf" value="([^"]+)"', page.text)
    answer = httpx.post(
        f"{bridge.url}/console/sign-in",
        data={"_csrf": token, "token": TOKEN},
        headers={**proxied, "cookie": nonce},
    )
    assert answer.status_code == 303
    session = next(c for c in answer.headers.get_list("set-cookie") if "bridge_console=" in c)
    assert "secure" in session.lower()


def test_rotating_the_token_signs_everyone_out(sink: RunningSink, tmp_path: Path) -> None:
    with Console("http://unused") as visitor:
        with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN) as bridge:
            visitor.http.base_url = httpx.URL(bridge.url)
            assert visitor.sign_in().status_code == 303
            assert visitor.get("/console/forget").status_code == 200
        old_form = visitor.csrf
        # A restart with the same token keeps the session (it is signed, not stored) ...
        with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN) as bridge:
            visitor.http.base_url = httpx.URL(bridge.url)
            assert visitor.get("/console").status_code == 200
        # ... a new token signs everyone out, and voids the forms they hold.
        with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN + "-rotated") as bridge:
            visitor.http.base_url = httpx.URL(bridge.url)
            answer = visitor.http.get("/console")
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in")
            stale = visitor.http.post(
                "/console/sign-in", data={"_csrf": old_form, "token": TOKEN + "-rotated"}
            )
            assert stale.status_code == 403
            assert visitor.sign_in(TOKEN + "-rotated").status_code == 303
            assert visitor.get("/console").status_code == 200


def test_a_session_is_signed_and_ends(bridge: ServerThread) -> None:
    keys = Keys(TOKEN)
    now = time.time()
    value = keys.session(now)
    assert keys.signed_in(value, now + SESSION_SECONDS - 1)
    assert not keys.signed_in(value, now + SESSION_SECONDS + 1)
    begun, nonce, signature = value.split(".")
    assert not keys.signed_in(f"{int(begun) + 3600}.{nonce}.{signature}", now)  # extended
    assert not Keys(TOKEN + "-rotated").signed_in(value, now)
    with Console(bridge.url) as forged:
        forged.http.cookies.set("bridge_console", f"{begun}.{nonce}.{'0' * 64}", path="/console")
        assert forged.get("/console").status_code == 303
        forged.http.cookies.set("bridge_console", value, path="/console")
        assert forged.get("/console").status_code == 200


def test_forms_without_the_csrf_token_or_from_another_site_are_refused(
    console: Console, bridge: ServerThread, sink: RunningSink
) -> None:
    before = httpx.get(f"{bridge.url}/metrics").text
    console.get("/console/forget")
    good = console.csrf
    attempts = [
        ({"user_id": "user_ops"}, {}),  # no token at all
        ({"_csrf": "f" * 64, "user_id": "user_ops"}, {}),  # a token of no cookie
        ({"_csrf": good, "user_id": "user_ops"}, {"origin": "https://evil.example"}),
        ({"_csrf": good, "user_id": "user_ops"}, {"sec-fetch-site": "cross-site"}),
    ]
    for data, headers in attempts:
        answer = console.http.post("/console/forget/confirm", data=data, headers=headers)
        assert answer.status_code == 403
        assert "Refused" in answer.text
    after = httpx.get(f"{bridge.url}/metrics").text
    csrf = 'bridge_console_refused_total{reason="csrf"}'
    origin = 'bridge_console_refused_total{reason="origin"}'
    assert metric(after, csrf) == metric(before, csrf) + 2
    assert metric(after, origin) == metric(before, origin) + 2
    # Nothing was forgotten: the same form from the console's own page goes through.
    assert httpx.get(f"{sink.url}/_sink/events").json()["events"] == []
    same_site = console.http.post(
        "/console/forget/confirm",
        data={"_csrf": good, "user_id": "user_ops"},
        headers={"origin": bridge.url, "sec-fetch-site": "same-origin"},
    )
    assert same_site.status_code == 200
    assert [e["route"] for e in sink.arrived(1)] == ["forget"]


def test_a_wrong_token_is_refused_logged_without_it_and_throttled(bridge: ServerThread) -> None:
    with (
        Console(bridge.url) as attacker,
        Console(bridge.url, **{"x-forwarded-for": "203.0.113.7"}) as other,
    ):
        throttled(bridge, attacker, other)


def throttled(bridge: ServerThread, attacker: Console, other: Console) -> None:
    before = httpx.get(f"{bridge.url}/metrics").text
    wrong = "wrong-token-" + "9" * 20
    answers = []
    with capture_logs() as logs:
        for _ in range(20):
            answer = attacker.sign_in(wrong)
            answers.append(answer.status_code)
            if answer.status_code == 429:
                break
    assert answers[:5] == [401] * 5
    assert answers[-1] == 429
    assert int(answer.headers["retry-after"]) >= 1
    assert "Too many wrong tokens" in answer.text
    assert "bridge_console=" not in answer.headers.get("set-cookie", "")
    # While it waits, even the right token is refused unread.
    assert attacker.sign_in().status_code == 429
    # Another client (behind the same proxy) is not held up.
    assert other.sign_in().status_code == 303
    lines = [e for e in logs if e["event"] == "console_sign_in"]
    assert {e["result"] for e in lines} == {"refused", "throttled"}
    assert all(wrong not in repr(e) and TOKEN not in repr(e) for e in logs)
    assert all("127.0.0.1" not in repr(e) for e in lines)  # a hash of the address
    after = httpx.get(f"{bridge.url}/metrics").text
    refused = 'bridge_console_sign_ins_total{result="refused"}'
    assert metric(after, refused) == metric(before, refused) + answers.count(401)
    assert metric(after, 'bridge_console_sign_ins_total{result="throttled"}') >= 2
    assert wrong not in after


def test_the_throttle_doubles_the_wait_after_the_free_tries() -> None:
    throttle = Throttle(free=3, longest=60, clients=2)
    now = 1000.0
    for n in range(1, 3):
        assert throttle.failed("a", now) == n
        assert throttle.wait("a", now) == 0
    assert throttle.failed("a", now) == 3
    assert throttle.wait("a", now) == 1
    assert throttle.failed("a", now + 1) == 4
    assert throttle.wait("a", now + 1) == 2
    for _ in range(10):
        throttle.failed("a", now + 1)
    assert throttle.wait("a", now + 1) == 60  # capped
    assert throttle.wait("b", now) == 0
    throttle.succeeded("a")
    assert throttle.wait("a", now + 1) == 0
    for client in ("a", "b", "c"):  # only the last `clients` are remembered
        for _ in range(3):
            throttle.failed(client, now)
    assert (throttle.wait("a", now), throttle.wait("c", now)) == (0, 1)


def test_a_delivery_is_listed_and_opened_and_its_raw_body_shown_on_request(
    console: Console, bridge: ServerThread, sink: RunningSink
) -> None:
    send_checkout(bridge)
    sink.arrived(1)
    listing = console.get("/console/deliveries")
    assert "evt_test_checkout_session_completed" in listing.text
    (link,) = set(re.findall(r'href="(/console/deliveries/\d+)"', listing.text))
    assert console.get("/console/deliveries?source=shopify").text.count("/console/deliveries/") == 0
    assert link in console.get("/console/deliveries?source=stripe&result=translated").text
    assert link not in console.get("/console/deliveries?result=quarantined").text

    page = console.get(link)
    assert page.status_code == 200
    assert re.search(r"<title>Delivery \d+ · millimetric-bridge</title>", page.text)
    assert "stripe-signature" in page.text  # the kept headers
    # The call it became, delivered, with Millimetric's answer.
    assert '<span class="state delivered">delivered</span>' in page.text
    assert re.search(r"<td>track</td>.*?accepted \d{4}-\d\d-\d\d", page.text, re.S)
    assert "Show raw body" in page.text
    assert "payment_intent" not in page.text  # the raw body, only on request
    raw = console.post(f"{link}/raw", {})
    assert raw.status_code == 200
    assert "pi_ops" in raw.text
    assert console.get(f"{link}/raw").status_code == 405  # never by a link
    assert console.get("/console/deliveries/999999").status_code == 404

    overview = console.get("/console")
    assert '<rect class="bar"' in overview.text  # a minute's deliveries
    assert "1 deliveries received" in overview.text
    assert re.search(r">stripe</a></td>\s*<td>yes</td>", overview.text)


def both_dead(console: Console) -> bool:
    """The checkout's two calls (a track, an identify) are both in dead letters."""
    page = console.get("/console/dead").text
    return "track call" in page and "identify call" in page


def test_a_dead_letter_is_replayed_and_arrives(
    console: Console, bridge: ServerThread, sink: RunningSink
) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_status": 400, "fail_for_seconds": 3600})
    send_checkout(bridge)
    wait_for(lambda: both_dead(console))
    dead = console.get("/console/dead")
    assert "sink fault" in dead.text  # Millimetric's answer, as the reason
    assert '<span class="figure">2</span>' in console.get("/console/panel").text
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 0})
    (track,) = re.findall(
        r"<td>track call</td>.*?name=\"id\" value=\"(\d+)\"", dead.text, flags=re.S
    )
    done = console.post("/console/dead/replay", {"kind": "call", "id": track})
    assert (done.status_code, done.headers["location"]) == (
        303,
        "/console/dead?done=replay&count=1",
    )
    assert [e["route"] for e in sink.arrived(1)] == ["track"]
    left = console.get("/console/dead").text
    assert "identify call" in left
    assert "track call" not in left


def test_dead_letters_of_a_source_are_purged(
    console: Console, bridge: ServerThread, sink: RunningSink
) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_status": 400, "fail_for_seconds": 3600})
    send_checkout(bridge)
    wait_for(lambda: both_dead(console))
    done = console.post("/console/dead/purge", {"kind": "source", "source": "stripe"})
    assert done.headers["location"] == "/console/dead?done=purge&count=2"
    assert "Purged: 2." in console.get(done.headers["location"]).text
    assert "No dead letters" in console.get("/console/dead").text
    refused = console.post("/console/dead/purge", {"kind": "call"})
    assert refused.status_code == 403


def test_forgetting_asks_first_and_keeps_the_user_id_out_of_urls_and_logs(
    console: Console, sink: RunningSink
) -> None:
    console.get("/console/forget")
    with capture_logs() as logs:
        asked = console.post("/console/forget", {"user_id": "user_ops"})
        assert asked.status_code == 200
        assert "Forget this user" in asked.text
        assert "<title>Forget a user · millimetric-bridge</title>" in asked.text
        time.sleep(0.3)
        assert httpx.get(f"{sink.url}/_sink/events").json()["events"] == []  # not yet
        done = console.post("/console/forget/confirm", {"user_id": "user_ops"})
        assert done.status_code == 200
        assert "Forgotten" in done.text
        (forget,) = sink.arrived(1)
    assert (forget["route"], forget["user_id"]) == ("forget", "user_ops")
    assert all("user_ops" not in repr(e) for e in logs)
    blank = console.post("/console/forget", {"user_id": "  "})
    assert blank.status_code == 400


def test_the_rate_chart_draws_a_bar_a_minute_and_the_calls_as_lines() -> None:
    from bridge.console.chart import HEIGHT, TOP, WIDTH, chart
    from bridge.store.views import Rates

    drawn = chart(Rates(since=0, step=60, received=[0, 4, 2], delivered=[0, 3, 3], dead=[0, 0, 1]))
    assert drawn.peak == 4
    assert [(b.x, b.height) for b in drawn.bars] == [
        (round(WIDTH / 3 + 1, 1), HEIGHT - TOP),
        (round(2 * WIDTH / 3 + 1, 1), (HEIGHT - TOP) / 2),
    ]
    received, delivered, dead = drawn.lines
    assert (received.total, delivered.total, dead.total) == (6, 6, 1)
    assert dead.points.split()[0] == f"{WIDTH / 6:.1f},{HEIGHT:.1f}"
    assert drawn.summary == (
        "Last 3 minutes: 6 deliveries received, 6 calls delivered, 1 calls dead; at most 4 a minute"
    )


def quarantined_ids(console: Console) -> list[str]:
    """The ids of the quarantined deliveries the dead letters page lists, in its order."""
    page = console.get("/console/dead").text
    return re.findall(
        r'name="kind" value="delivery"><input type="hidden" name="id" value="(\d+)">'
        r"\s*<button type=\"submit\">Translate again",
        page,
    )


def test_quarantined_deliveries_are_translated_again_one_or_by_source(
    console: Console, bridge: ServerThread, sink: RunningSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler bug quarantines two deliveries; once fixed, one is translated again from
    its row and the other with its source's "Replay all", which leaves the source's
    translated deliveries alone."""
    send_checkout(bridge)  # translated before the bug: not translated again by source
    assert [e["event_id"] for e in sink.arrived(2) if e["route"] == "track"] == ["purchase:pi_ops"]

    def broken(*args: object) -> NoReturn:
        raise RuntimeError("a bug in the plugin")

    monkeypatch.setattr(StripeHandler, "translate", broken)
    for n in ("one", "two"):
        body, headers = signed_payment(n)
        assert httpx.post(f"{bridge.url}/webhooks/stripe", content=body, headers=headers).is_success
    wait_for(lambda: len(quarantined_ids(console)) == 2)
    assert "handler: RuntimeError: a bug in the plugin" in console.get("/console/dead").text
    monkeypatch.undo()  # the fix is deployed

    first, second = quarantined_ids(console)
    done = console.post("/console/dead/replay", {"kind": "delivery", "id": first})
    assert done.headers["location"] == "/console/dead?done=replay&count=1"
    assert quarantined_ids(console) == [second]
    done = console.post("/console/dead/replay", {"kind": "source", "source": "stripe"})
    assert done.headers["location"] == "/console/dead?done=replay&count=1"
    assert "No dead letters" in console.get("/console/dead").text
    tracks = [e["event_id"] for e in sink.arrived(3 * 2) if e["route"] == "track"]
    assert sorted(tracks) == ["purchase:pi_one", "purchase:pi_ops", "purchase:pi_two"]


def signed_payment(n: str) -> tuple[bytes, dict[str, str]]:
    """A checkout of its own: event, payment intent and user named by `n`."""
    event = msgspec.json.decode(FIXTURE.read_bytes())
    event["id"] = f"evt_console_{n}"
    event["data"]["object"].update(
        mode="payment", payment_intent=f"pi_{n}", client_reference_id=f"user_{n}"
    )
    body = msgspec.json.encode(event)
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    return body, {"stripe-signature": header}
