"""The console in a real browser: Playwright driving Debian's headless Chromium against a
real bridge and the real local sink.

Without Chromium (or Playwright) the tests skip, saying why; under CI=true or
BRIDGE_REQUIRE_BROWSER=1 they fail instead. The screenshots they take go to
docs/console/ when BRIDGE_SCREENSHOTS=1 (the README shows them), else to a temporary
folder, so that a test run leaves the work tree as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from litestar import Litestar, get
from litestar.response import Response

from tests.conftest import RunningSink, ServerThread
from tests.test_operations import SECRET, serve

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

TOKEN = "browser-console-token-0123456789"
DOCS = Path(__file__).parent.parent / "docs" / "console"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}
#: The sources configured beside Stripe, for an overview with more than one.
SECRETS = {
    "SHOPIFY_WEBHOOK_SECRET": "shopify-console-secret",
    "GITHUB_WEBHOOK_SECRET": "github-console-secret",
}


def _required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("BRIDGE_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason}; CI=true / BRIDGE_REQUIRE_BROWSER=1 needs it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    executable = shutil.which("chromium")
    if executable is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e . --group dev)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    if os.environ.get("BRIDGE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    return tmp_path


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[ServerThread]:
    with serve(sink, tmp_path, BRIDGE_ADMIN_TOKEN=TOKEN, **SECRETS) as server:
        yield server


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=LAPTOP)  # type: ignore[arg-type]
    try:
        yield context.new_page()
    finally:
        context.close()


def send_test(bridge: ServerThread, tmp_path: Path, source: str, event: str) -> None:
    """`millimetric-bridge send-test`, as an operator runs it against a bridge."""
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        **SECRETS,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "send-test", source, event, "--url", bridge.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("200 ")


def sign_in(page: Page, bridge: ServerThread, token: str = TOKEN) -> None:
    page.goto(f"{bridge.url}/console")
    assert page.url.endswith("/console/sign-in")
    page.get_by_label("Admin token").fill(token)
    follow(page, page.get_by_role("button", name="Sign in"))


def follow(page: Page, target: Locator) -> None:
    """Click a link or a form's button, and wait for the page it leads to."""
    with page.expect_navigation():
        target.click()


def until(page: Page, check: Callable[[], bool], within: float = 15) -> None:
    """Reload the page until `check` holds (what the pipeline does takes its time)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not shown in time: {page.inner_text('main')}"
        time.sleep(0.2)
        page.reload()


def test_sign_in_and_open_a_delivery_sent_with_send_test(
    page: Page, bridge: ServerThread, sink: RunningSink, tmp_path: Path, shots: Path
) -> None:
    send_test(bridge, tmp_path, "stripe", "checkout.session.completed")
    send_test(bridge, tmp_path, "stripe", "customer.subscription.created")
    send_test(bridge, tmp_path, "shopify", "orders/paid")
    send_test(bridge, tmp_path, "github", "sponsorship")
    sink.arrived(3)
    sign_in(page, bridge)
    assert page.url == f"{bridge.url}/console"
    assert page.title() == "Overview · millimetric-bridge"
    until(page, lambda: "4 deliveries received" in page.inner_text("figcaption"))
    stripe = page.locator("tr", has=page.get_by_role("link", name="stripe", exact=True))
    assert stripe.locator("td").nth(1).inner_text() == "yes"
    assert page.locator("svg rect.bar").count() >= 1  # 4 deliveries, in one minute or two
    page.screenshot(path=shots / "overview.png", full_page=True)

    follow(page, page.get_by_role("link", name="Deliveries", exact=True))
    assert page.title() == "Deliveries · millimetric-bridge"
    rows = page.locator("tbody tr")
    assert rows.count() == 4
    page.select_option("select[name=source]", "stripe")
    follow(page, page.get_by_role("button", name="Show"))
    assert page.locator("tbody tr").count() == 2
    page.screenshot(path=shots / "deliveries.png", full_page=True)

    follow(page, page.locator("tbody tr").last.get_by_role("link").first)  # the older: the checkout
    assert page.title().startswith("Delivery ")
    assert page.locator("th", has_text="stripe-signature").count() == 1
    calls = page.locator("table").nth(1)
    until(page, lambda: "accepted" in page.locator("table").nth(1).inner_text())
    assert "track" in calls.inner_text()
    assert "checkout.session.completed" not in page.locator("main").inner_text()  # raw: hidden
    follow(page, page.get_by_role("button", name="Show raw body"))
    assert '"type": "checkout.session.completed"' in page.locator("pre.raw").inner_text()
    assert "/raw" in page.url  # a POST's answer: nothing of the body in the URL
    page.screenshot(path=shots / "delivery.png", full_page=True)


def test_a_dead_letter_is_replayed_and_arrives_at_the_sink(
    page: Page, bridge: ServerThread, sink: RunningSink, tmp_path: Path, shots: Path
) -> None:
    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_status": 400, "fail_for_seconds": 3600})
    send_test(bridge, tmp_path, "stripe", "checkout.session.completed")
    send_test(bridge, tmp_path, "stripe", "checkout.session.completed")  # a new event
    sign_in(page, bridge)
    follow(page, page.get_by_role("link", name="Dead letters", exact=True))
    until(page, lambda: page.locator("tbody tr").count() == 2)
    assert "sink fault" in page.locator("tbody").inner_text()  # Millimetric's answer
    page.screenshot(path=shots / "dead-letters.png", full_page=True)

    httpx.post(f"{sink.url}/_sink/knobs", json={"fail_for_seconds": 0})
    follow(page, page.locator("tbody tr").first.get_by_role("button", name="Replay"))
    assert page.get_by_role("status").inner_text() == "Sent again: 1."
    (arrived,) = sink.arrived(1)
    assert arrived["route"] == "track"
    assert page.locator("tbody tr").count() == 1  # the other one is still there


def test_forget_asks_for_confirmation(
    page: Page, bridge: ServerThread, sink: RunningSink, shots: Path
) -> None:
    sign_in(page, bridge)
    follow(page, page.get_by_role("link", name="Forget", exact=True))
    page.get_by_label("User id").fill("user_1234")
    follow(page, page.get_by_role("button", name="Continue"))
    assert page.url == f"{bridge.url}/console/forget"  # the id is in no URL
    assert "user_1234" not in page.title()
    page.screenshot(path=shots / "forget.png", full_page=True)
    assert httpx.get(f"{sink.url}/_sink/events").json()["events"] == []
    follow(page, page.get_by_role("button", name="Forget this user"))
    assert "Forgotten" in page.get_by_role("status").inner_text()
    (forget,) = sink.arrived(1)
    assert (forget["route"], forget["user_id"]) == ("forget", "user_1234")


def test_a_wrong_token_is_refused(page: Page, bridge: ServerThread) -> None:
    answers: list[int] = []
    page.on("response", lambda r: answers.append(r.status) if r.request.method == "POST" else None)
    sign_in(page, bridge, "not-the-token")
    assert answers == [401]
    assert page.get_by_role("alert").inner_text() == "Wrong token."
    assert page.url.endswith("/console/sign-in")
    page.goto(f"{bridge.url}/console")
    assert page.url.endswith("/console/sign-in")
    assert not [c for c in page.context.cookies() if c["name"] == "bridge_console"]


def test_a_cross_site_post_is_refused(page: Page, bridge: ServerThread, sink: RunningSink) -> None:
    """Another site's page posts a forget to the console of a browser signed in to it."""

    @get("/", media_type="text/html")
    async def evil() -> Response[str]:
        return Response(
            f'<form method="post" action="{bridge.url}/console/forget/confirm">'
            '<input name="user_id" value="victim"><button>win a prize</button></form>',
            media_type="text/html",
        )

    with ServerThread(Litestar([evil])) as other_site:
        sign_in(page, bridge)
        assert page.title() == "Overview · millimetric-bridge"
        page.goto(other_site.url)
        with page.expect_response(lambda r: "/console/forget/confirm" in r.url) as posted:
            follow(page, page.get_by_role("button", name="win a prize"))
        assert posted.value.status == 403
        assert "another site" in page.get_by_role("alert").inner_text()
    time.sleep(0.5)
    assert httpx.get(f"{sink.url}/_sink/events").json()["events"] == []


def test_the_overview_fits_a_phone(
    browser: Browser, bridge: ServerThread, sink: RunningSink, tmp_path: Path, shots: Path
) -> None:
    send_test(bridge, tmp_path, "stripe", "checkout.session.completed")
    send_test(bridge, tmp_path, "shopify", "orders/paid")  # a test order: stored, no call
    sink.arrived(1)
    context = browser.new_context(viewport=PHONE, is_mobile=True)  # type: ignore[arg-type]
    try:
        phone = context.new_page()
        sign_in(phone, bridge)
        until(phone, lambda: "2 deliveries received" in phone.inner_text("figcaption"))
        widths: Any = phone.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert widths[0] <= widths[1] == PHONE["width"], widths
        phone.screenshot(path=shots / "overview-phone.png", full_page=True)
        for path in ("/console/deliveries", "/console/dead", "/console/forget"):
            phone.goto(f"{bridge.url}{path}")
            assert phone.evaluate(
                "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
            ), path
    finally:
        context.close()
