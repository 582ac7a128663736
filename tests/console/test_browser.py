"""The console and the portal in a real browser (Chromium through Playwright) against `tollgate dev`:
sign in by keyboard, create a tenant, grant credit, create a key, send a completion through the openai
client with it and watch the balance card and the burn-down chart change without a reload, see the usage
in the history, void a grant after its confirmation, revoke the key, open a portal link in another
browser context (only that tenant), an expired and an altered link refused. Every page: no JavaScript
error, every control labelled. Screenshots go to docs/screenshots/ (the README shows them) when
TOLLGATE_UPDATE_SCREENSHOTS=1, else to a temporary directory."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from openai import AuthenticationError, OpenAI

from gateway.console.signing import PORTAL, signer_for
from tests.console.browser import chromium_or_skip
from tests.fixtures.processes import free_port
from tests.test_dev_smoke import start_dev, stop, wait_for_demo

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
# The README's screenshots are refreshed only when asked (TOLLGATE_UPDATE_SCREENSHOTS=1): a test run leaves
# the checkout as it was; otherwise they go to a temporary directory.
SCREENSHOTS = (
    REPO_ROOT / "docs" / "screenshots"
    if os.environ.get("TOLLGATE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "tollgate-screenshots"
)
REFRESH_TIMEOUT_MS = 60_000  # htmx refreshes every 5 s; the usage reaches the projection within seconds
TABS_MAX = 40
GRANTED = 200_000

SETTLED_JS = "Number(document.querySelector('[data-balance=settled]').textContent.replace(/,/g, ''))"
SETTLED_BELOW_JS = f"(n) => {SETTLED_JS} < n"
UNLABELLED_CONTROLS_JS = """() => Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
  .map(el => el.outerHTML)"""


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-dev")
    data_dir, log_path = tmp / ".tollgate", tmp / "dev.log"
    started = time.time()
    process = start_dev(data_dir, free_port(), free_port(), log_path)
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, started - 1)
        demo["base"] = demo["base_url"].removesuffix("/v1")
        assert f"{demo['base']}/console" in log_path.read_text(), "the banner prints the console URL"
        yield demo
    finally:
        assert stop(process) == 0, log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def chromium():
    path = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page whose JavaScript errors (console errors and uncaught exceptions) are collected."""

    def __init__(self, context) -> None:
        self.page = context.new_page()
        self.page.set_viewport_size({"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def check(self, name: str | None = None) -> None:
        """No JavaScript error so far; every control labelled; a screenshot when named."""
        assert self.errors == [], self.errors
        assert self.page.evaluate(UNLABELLED_CONTROLS_JS) == [], self.page.url
        if name is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def refused(self, url: str) -> str:
        """Open a page that must answer 403; Chromium logs that status as a console error: expected here."""
        response = self.page.goto(url)
        assert response.status == 403, (url, response.status)
        self.errors.remove("Failed to load resource: the server responded with a status of 403 (Forbidden)")
        return self.page.inner_text("main")

    def tab_to(self, selector: str) -> None:
        """Keyboard only: Tab from the top of the page until `selector` has the focus."""
        self.page.locator("body").focus()
        for _ in range(TABS_MAX):
            self.page.keyboard.press("Tab")
            if self.page.evaluate("(s) => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"{selector} not reached with {TABS_MAX} Tab presses on {self.page.url}")

    def settled(self) -> int:
        return int(
            self.page.locator('[data-balance="settled"]').inner_text().replace(",", "").replace("—", "-1")
        )

    def chart_remaining(self) -> int:
        self.page.wait_for_selector("#burndown[data-loaded]")
        return int(self.page.get_attribute("#burndown", "data-remaining"))


def sign_in(w: Watched, dev: dict) -> None:
    w.page.goto(f"{dev['base']}/console")
    assert w.page.url.endswith("/console/sign-in")
    w.check("sign-in")
    w.tab_to("#token")
    w.page.keyboard.type(dev["admin_token"])
    w.page.keyboard.press("Enter")
    w.page.wait_for_url(re.compile(r"/console$"))
    assert dev["admin_token"] not in w.page.url


def iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def complete(dev: dict, key: str) -> None:
    client = OpenAI(base_url=dev["base_url"], api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model="tollgate-tiny", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=16
    )
    assert answer.usage.completion_tokens > 0


def test_operator_console_and_tenant_portal_in_chromium(dev, chromium):
    context = chromium.new_context()
    w = Watched(context)
    sign_in(w, dev)
    w.page.wait_for_selector('[data-metric="tenants"]')
    w.check("overview")

    w.page.click("text=Tenants")
    w.page.fill("#tenant-name", "Browser Co")
    w.page.select_option("#tenant-tier", "pro")
    w.page.click("text=Create tenant")
    w.page.wait_for_selector("text=Tenant created.")
    tenant_url = w.page.url.split("?")[0]
    tenant_id = tenant_url.rsplit("/", 1)[1]

    two_days_ago, yesterday = iso(time.time() - 2 * 86_400), iso(time.time() - 86_400)
    w.tab_to("#grant-amount")  # the main actions are reachable by keyboard
    w.page.keyboard.type(str(GRANTED))
    w.page.fill("#grant-effective", two_days_ago)
    w.page.fill("#grant-reference", "INV-browser")
    w.page.click("#grant-form button[type=submit]")
    w.page.wait_for_selector("text=Credit granted.")
    # A block that ran out yesterday, unused: on the chart until its expiry marker, not in the balance.
    w.page.fill("#grant-amount", "50000")
    w.page.fill("#grant-effective", two_days_ago)
    w.page.fill("#grant-expires", yesterday)
    w.page.click("#grant-form button[type=submit]")
    w.page.wait_for_selector("text=Credit granted.")
    w.page.wait_for_function(
        "(n) => document.querySelector('[data-balance=\"settled\"]').textContent.replace(/,/g, '') == n",
        arg=str(GRANTED),
        timeout=REFRESH_TIMEOUT_MS,
    )
    assert w.chart_remaining() in (0, GRANTED)  # the chart may have drawn before the projection caught up

    w.page.click("#create-key")
    key = w.page.input_value("#new-key")
    assert key and key not in w.page.url
    w.check()
    w.page.click("text=Back to the tenant")

    w.page.reload()
    before_chart = w.chart_remaining()
    complete(dev, key)
    # No reload: htmx refreshes the balance card, and the chart redraws with it.
    w.page.wait_for_function(SETTLED_BELOW_JS, arg=GRANTED, timeout=REFRESH_TIMEOUT_MS)
    w.page.wait_for_function(
        "(n) => Number(document.querySelector('#burndown').dataset.remaining) < n",
        arg=GRANTED,
        timeout=REFRESH_TIMEOUT_MS,
    )
    after = w.settled()
    assert after < GRANTED and w.chart_remaining() == after
    assert before_chart == GRANTED
    w.page.reload()
    w.page.wait_for_selector("#burndown[data-loaded]")
    history = w.page.locator("#history tbody tr").first.inner_text()
    assert "usage_allocated" in history and "tollgate-tiny" in history and f"{after:,}" in history
    assert "runs out on" in w.page.inner_text("#burndown-projection")
    w.check()

    w.page.fill("#grant-amount", "5000")
    w.page.fill("#grant-expires", "2099-01-01T00:00:00Z")
    w.page.click("#grant-form button[type=submit]")
    w.page.wait_for_selector("text=Credit granted.")
    w.page.click("text=Void…")
    assert "/void" in w.page.url and "cannot be undone" in w.page.inner_text("main")
    w.check()
    w.page.click("#confirm-void")
    w.page.wait_for_selector("text=Grant voided.")
    assert "voided" in w.page.inner_text("#grants")
    w.page.wait_for_selector("#burndown[data-loaded]")
    w.check("tenant")

    w.page.click("[data-key] button:has-text('Revoke')")
    w.page.wait_for_selector("text=Key revoked.")
    assert "revoked" in w.page.inner_text("#keys")
    deadline = time.monotonic() + 10
    while True:
        try:
            complete(dev, key)
        except AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key keeps working"
        time.sleep(0.5)

    w.page.click("#portal-link")
    link = w.page.input_value("#portal-url")
    w.check()
    portal = Watched(chromium.new_context())  # the tenant: no console session
    portal.page.goto(link)
    portal.page.wait_for_url(re.compile(r"/portal$"))
    text = portal.page.inner_text("main")
    assert "Browser Co" in text and tenant_id in text
    assert dev["tenant_id"] not in portal.page.content(), "nothing of another tenant"
    assert "Grant credit" not in text and "API keys" not in text, "read-only"
    portal.page.wait_for_selector("#burndown[data-loaded]")
    portal.check("portal")
    assert portal.page.goto(f"{dev['base']}/console").url.endswith("/console/sign-in"), "no console access"

    signer = signer_for(None, dev["admin_token"])
    expired = signer.sign(PORTAL, {"t": tenant_id, "exp": int(time.time() * 1000) - 1})
    stranger = Watched(chromium.new_context())
    assert "expired" in stranger.refused(f"{dev['base']}/portal/enter/{expired}")
    stranger.check("portal-expired")
    altered = link[:-2] + ("AA" if not link.endswith("AA") else "BB")
    assert "not valid" in stranger.refused(altered)
    assert "Open the portal with the link" in stranger.refused(f"{dev['base']}/portal")
    assert w.errors == [] and portal.errors == [] and stranger.errors == []
