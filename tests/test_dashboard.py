"""The cluster dashboard in a real browser (SPEC 14): headless Chromium from Debian, driven by selenium, on the
page a user gets from `promptise-asgi coordinator` and from `promptise-asgi demo`.

Nodes run as `promptise-asgi node` subprocesses; the page is only ever clicked and read as a person would
(accessible names: the `URL` column header, `Start`/`Stop`/`Restart`, `Inject`, `Broadcast`, a password
field, a search field, `Next`). A run saves a screenshot of the page to docs/images/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import httpx
import pytest
from support import ROOT, cli_process, free_port, free_port_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXAMPLE = ROOT / "examples" / "promptise.toml"
SCREENSHOT = ROOT / "docs" / "images" / "dashboard.png"
T = TypeVar("T")


def require_chromium() -> None:
    if shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER):
        return
    reason = "Debian's chromium and chromium-driver are not installed (scripts/test installs them as root)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def eventually(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll `check` until it returns something truthy (swallowing stale-element races); fail naming `what`."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (StaleElementReferenceException, WebDriverException):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def errors_in_console(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


class Cluster:
    """A `promptise-asgi coordinator` and its nodes, as subprocesses on free loopback ports."""

    def __init__(self, stack: ExitStack, env: dict[str, str]) -> None:
        self.stack = stack
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ("coordinator", "--port", str(self.port), "--health-check-interval", "0.5", "--node-timeout", "1.5")
        self.process = stack.enter_context(cli_process(*args, env=env))
        self.process.wait_for_line("coordinator serving on")
        self.nodes: dict[str, Any] = {}

    def add_node(self, node_id: str) -> int:
        port = free_port()
        args = ("node", "--config", str(EXAMPLE), "--port", str(port), "--node-id", node_id)
        node = self.stack.enter_context(cli_process(*args, "--coordinator", self.url, env=self.env))
        node.wait_for_line("registering with")
        self.nodes[node_id] = node
        return port


@contextmanager
def cluster(env: dict[str, str] | None = None) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(stack, env or {})


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    driver.get_log("browser")  # start each page with an empty log


def row(driver: Any, node_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#nodes tr[data-node="{node_id}"]')


def cells(driver: Any, node_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [cell.text for cell in row(driver, node_id).find_elements(By.TAG_NAME, "td")]


def process_row(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#processes tr[data-process="{name}"]')


def button(parent: Any, label: str) -> Any:
    from selenium.webdriver.common.by import By

    return parent.find_element(By.XPATH, f".//button[normalize-space()='{label}']")


class TestDashboard:
    def test_live_cluster_control_events_and_a_dead_node(self, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        with cluster() as c:
            c.add_node("node-1")
            open_page(browser, c.url)
            assert browser.current_url == c.url + "/ui/"
            headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#nodes thead th")]
            assert "URL" in headers
            eventually(lambda: cells(browser, "node-1")[2] == "healthy", "node-1 healthy")
            assert eventually(lambda: browser.find_element(By.ID, "connection").text == "live", "live badge")

            # A node that registers while the page is open appears without a reload.
            port = c.add_node("node-2")
            eventually(lambda: cells(browser, "node-2")[1] == f"http://127.0.0.1:{port}", "node-2 appears live")
            eventually(lambda: browser.find_element(By.ID, "total-nodes").text == "2", "the summary counts it")

            # Stop on a process turns it stopped in the page and on the node.
            button(row(browser, "node-2"), "node-2").click()
            eventually(lambda: process_row(browser, "echo").is_displayed(), "node-2's processes")
            button(process_row(browser, "echo"), "Stop").click()
            eventually(lambda: "stopped" in process_row(browser, "echo").text, "echo stopped in the page")
            state = httpx.get(f"http://127.0.0.1:{port}/processes/echo/status").json()["state"]
            assert state == "stopped"

            # An injected event raises the received count.
            def received() -> int:
                return int(process_row(browser, "watcher").find_elements(By.TAG_NAME, "td")[3].text)

            before = eventually(lambda: (received(),), "the received count")[0]  # rows are redrawn on changes
            from selenium.webdriver.support.ui import Select

            Select(browser.find_element(By.ID, "inject-process")).select_by_visible_text("watcher")
            payload = browser.find_element(By.ID, "inject-payload")
            payload.clear()
            payload.send_keys("not json")
            button(browser.find_element(By.ID, "inject-form"), "Inject").click()
            assert "not JSON" in eventually(lambda: browser.find_element(By.ID, "inject-result").text, "refusal")
            assert eventually(lambda: (received(),), "the received count")[0] == before  # nothing was sent
            payload.clear()
            payload.send_keys('{"order": 42}')
            button(browser.find_element(By.ID, "inject-form"), "Inject").click()
            eventually(lambda: received() == before + 1, "the received count rises")

            # Broadcast reaches every node.
            browser.find_element(By.ID, "broadcast-process").send_keys("watcher")
            button(browser.find_element(By.ID, "broadcast-form"), "Broadcast").click()
            assert eventually(
                lambda: "2 of 2 nodes accepted it" in browser.find_element(By.ID, "broadcast-result").text, "broadcast"
            )

            # The live feed shows changes; the page is screenshotted for the docs.
            eventually(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#feed li")) >= 3, "the live feed")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(SCREENSHOT))

            # A killed node turns unhealthy on the page; filtered by health, it leaves the healthy view.
            search = browser.find_element(By.CSS_SELECTOR, "input[type=search]")
            search.send_keys("healthy")
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-2 of 2", "both healthy")
            c.nodes["node-1"].process.kill()
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-1 of 1", "node-1 left the view")
            assert browser.find_elements(By.CSS_SELECTOR, '#nodes tr[data-node="node-1"]') == []
            clear = "arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input'))"
            browser.execute_script(clear, search)  # as a person deleting the text (an input event)
            eventually(lambda: cells(browser, "node-1")[2].startswith("unhealthy"), "node-1 unhealthy", timeout=20)
            assert errors_in_console(browser) == []

    def test_the_reconnecting_state_is_visible_while_the_stream_is_down(self, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        with cluster() as c:
            open_page(browser, c.url)
            eventually(lambda: browser.find_element(By.ID, "connection").text == "live", "live")
            c.process.interrupt()
            eventually(lambda: browser.find_element(By.ID, "connection").text == "reconnecting", "reconnecting")

    def test_values_from_nodes_are_text_and_run_nothing(self, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        with cluster() as c:
            evil = "<img src=x onerror=window.pwned=1>"
            body = {"node_id": "n1", "url": "http://127.0.0.9:9", "metadata": {"note": evil}}
            assert httpx.post(f"{c.url}/cluster/nodes", json=body).status_code == 200
            open_page(browser, c.url)
            eventually(lambda: evil in cells(browser, "n1")[5], "the metadata shown as text")
            assert browser.execute_script("return window.pwned") is None
            assert browser.find_elements(By.CSS_SELECTOR, "#nodes img") == []
            policy = httpx.get(f"{c.url}/ui/").headers
            assert policy["content-security-policy"].startswith("default-src 'self'")
            assert "frame-ancestors 'none'" in policy["content-security-policy"]
            assert policy["x-content-type-options"] == "nosniff"

    def test_sign_in_with_a_token_and_a_read_only_token_sees_no_controls(self, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        env = {"PROMPTISE_AUTH_TOKEN": "ops-token", "PROMPTISE_READ_TOKEN": "viewer-token"}
        with cluster(env) as c:
            c.add_node("node-1")
            for token, controls in (("wrong", None), ("viewer-token", False), ("ops-token", True)):
                open_page(browser, c.url)
                browser.execute_script("sessionStorage.clear()")
                browser.refresh()
                field = eventually(lambda: browser.find_element(By.ID, "token"), "the sign-in form")
                assert field.get_attribute("type") == "password"
                field.send_keys(token)
                button(browser.find_element(By.ID, "login-form"), "Sign in").click()
                if controls is None:
                    assert "refused" in eventually(lambda: browser.find_element(By.ID, "login-error").text, "refusal")
                    continue
                eventually(lambda: cells(browser, "node-1")[2] == "healthy", "the table after sign-in")
                button(row(browser, "node-1"), "node-1").click()
                eventually(lambda: process_row(browser, "echo").is_displayed(), "processes")
                assert button(process_row(browser, "echo"), "Stop").is_displayed() is controls
                assert browser.find_element(By.ID, "broadcast-form").is_displayed() is controls
            assert browser.execute_script("return document.cookie") == ""
            assert "ops-token" not in browser.page_source

    def test_a_thousand_nodes_render_in_under_a_second_and_filter_and_page(self, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        with cluster() as c, httpx.Client(base_url=c.url) as client:
            for i in range(1000):
                body = {"node_id": f"n{i:04d}", "url": f"http://127.0.{i // 250}.{i % 250 + 1}:9", "metadata": {"i": i}}
                if i % 100 == 7:
                    body["metadata"] = {"zone": "eu-west-1"}
                assert client.post("/cluster/nodes", json=body).status_code == 200
            started = time.monotonic()
            open_page(browser, c.url)
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-100 of 1000", "the first page")
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"first render took {elapsed:.2f}s"
            assert len(browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")) == 100

            # Pages come from the coordinator (`GET /cluster/nodes?after=`), forward and back.
            button(browser, "Next").click()
            assert eventually(lambda: cells(browser, "n0100"), "page 2")
            assert browser.find_element(By.ID, "page-info").text == "101-200 of 1000"
            button(browser, "Previous").click()
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-100 of 1000", "page 1 again")

            # A node that joins on the page shown appears in place; the rows around it are the same elements.
            browser.execute_script("document.querySelector('#nodes tr[data-node=n0001]').dataset.marked = 'yes'")
            body = {"node_id": "n0000a", "url": "http://127.0.9.9:9", "metadata": {}}
            assert client.post("/cluster/nodes", json=body).status_code == 200
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-100 of 1001", "the join")
            assert cells(browser, "n0000a")[1] == "http://127.0.9.9:9"
            assert row(browser, "n0001").get_attribute("data-marked") == "yes"

            search = browser.find_element(By.CSS_SELECTOR, "input[type=search]")
            search.send_keys("eu-west")
            eventually(lambda: browser.find_element(By.ID, "page-info").text == "1-10 of 10", "filtered")
            assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None
            assert errors_in_console(browser) == []


# Test-only: the page's fetch, slowed or failed per URL, with a count of the slowed answers delivered.
FETCH_HOOK = """
window.__delay = () => 0; window.__fail = () => false; window.__delivered = 0;
const original = window.fetch;
window.fetch = async (input, init) => {
  const url = String(input);
  if (window.__fail(url)) throw new TypeError("simulated network failure");
  const response = await original(input, init);
  const delay = window.__delay(url);
  if (delay) { await new Promise((resolve) => setTimeout(resolve, delay)); window.__delivered += 1; }
  return response;
};
"""


def test_pages_stay_right_when_answers_are_late_or_fail_and_nodes_leave(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def info() -> str:
        return str(browser.find_element(By.ID, "page-info").text)

    def first_row() -> str:
        return str(browser.execute_script("return document.querySelector('#nodes tbody tr').dataset.node"))

    with cluster() as c, httpx.Client(base_url=c.url) as client:
        for i in range(300):
            body = {"node_id": f"n{i:04d}", "url": f"http://127.0.1.{i % 250 + 1}:9", "metadata": {}}
            assert client.post("/cluster/nodes", json=body).status_code == 200
        open_page(browser, c.url)
        eventually(lambda: info() == "1-100 of 300", "the first page")
        browser.execute_script(FETCH_HOOK)

        # Next, then Previous before the slow answer to Next: the late answer is not drawn.
        button(browser, "Next").click()
        eventually(lambda: info() == "101-200 of 300", "page 2")
        browser.execute_script("window.__delay = (url) => url.includes('after=n0199') ? 800 : 0")
        button(browser, "Next").click()
        button(browser, "Previous").click()
        eventually(lambda: info() == "1-100 of 300", "page 1")
        eventually(lambda: browser.execute_script("return window.__delivered") == 1, "the late answer arrived")
        assert (info(), first_row()) == ("1-100 of 300", "n0000")

        # A page that fails to load leaves the page shown, and its cursors, as they were.
        browser.execute_script("window.__delay = () => 0; window.__fail = (url) => url.includes('after=')")
        button(browser, "Next").click()
        eventually(lambda: info().startswith("error:"), "the error shown")
        assert first_row() == "n0000"
        browser.execute_script("window.__fail = () => false")
        button(browser, "Next").click()
        eventually(lambda: info() == "101-200 of 300", "page 2 after the failure")
        assert first_row() == "n0100"

        # A node that leaves from another page changes the count of the page shown.
        assert client.delete("/cluster/nodes/n0250").status_code == 200
        eventually(lambda: info() == "101-200 of 299", "the leave counted")
        assert browser.find_element(By.ID, "total-nodes").text == "299"
        assert errors_in_console(browser) == []


def test_the_demo_prints_its_dashboard_and_serves_it(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    port = free_port_run(3)  # the demo's coordinator and its two nodes
    with cli_process("demo", "--port", str(port), "--interval", "1") as demo:
        line = demo.wait_for_line("dashboard")
        assert f"http://127.0.0.1:{port}/ui/" in line
        open_page(browser, f"http://127.0.0.1:{port}")
        eventually(lambda: browser.find_element(By.ID, "healthy-nodes").text == "2", "the demo's two nodes")
        assert errors_in_console(browser) == []
        demo.interrupt()
