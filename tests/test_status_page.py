"""The status page (/admin/ui) in a real headless Chromium (Debian's, driven through chromedriver
by Selenium): it loads with no console errors, shows every provider, and after a scripted 429
shows that provider blocked with its reason and the failover in the feed, without a reload; its
buttons block and unblock by hand (issue 14).

The browser runs in a worker thread (Selenium is synchronous) while the gateway serves on trio.
Set CASCADE_SCREENSHOT=path to save what the browser saw (docs/status-page.png is made so).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.live import Exchange, FakeUpstream, healthy, live_gateway

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def chromium() -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("chromium and chromedriver are needed: run .ci/system-deps")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # this machine has no network beyond loopback
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,520",
        f"--user-data-dir={tempfile.mkdtemp(prefix='cascade-chromium-')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


PRIMARY = 'tr[data-provider="primary"]'
BACKUP = 'tr[data-provider="backup"]'


def text(driver: webdriver.Chrome, selector: str) -> str:
    """The text of the first match, read in one step (the page redraws every second, so an
    element found in one call may be gone by the next)."""
    found: str = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", selector
    )
    return found


def click(driver: webdriver.Chrome, selector: str) -> None:
    driver.execute_script("document.querySelector(arguments[0]).click()", selector)


def browse(url: str, gateway: str) -> dict[str, Any]:
    """What the browser saw, step by step (runs in a thread: it blocks)."""
    seen: dict[str, Any] = {}
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 15, poll_frequency=0.05)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#providers tr[data-provider]"))
        driver.execute_script("window.loadedOnce = true")  # gone if the page ever reloads
        rows = driver.find_elements(By.CSS_SELECTOR, "#providers tr[data-provider]")
        seen["providers"] = sorted(r.get_attribute("data-provider") for r in rows)

        with httpx.Client(base_url=gateway) as client:  # the scripted 429 on `primary`
            seen["answer"] = client.post(
                "/v1/chat/completions",
                json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
            ).status_code

        wait.until(lambda d: "rate_limited" in text(d, PRIMARY))
        seen["primary_state"] = text(driver, PRIMARY + " .pill")
        seen["primary_block"] = text(driver, PRIMARY + " .block")
        wait.until(lambda d: text(d, "#feed li"))
        seen["feed"] = text(driver, "#feed li")
        seen["serving"] = driver.execute_script(
            "return [...document.querySelectorAll('.serving')].map(e => e.textContent)"
        )
        seen["not_reloaded"] = driver.execute_script("return window.loadedOnce === true")

        click(driver, BACKUP + " .block-button")
        wait.until(lambda d: "manual" in text(d, BACKUP))
        seen["manual"] = text(driver, BACKUP + " .block")
        if path := os.environ.get("CASCADE_SCREENSHOT"):
            driver.save_screenshot(path)
        click(driver, BACKUP + " .unblock-button")
        wait.until(lambda d: "manual" not in text(d, BACKUP))
        seen["console"] = [
            entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")
        ]
    finally:
        driver.quit()
    return seen


async def test_the_status_page_shows_a_block_and_the_failover_live() -> None:
    limited = True

    async def primary_handler(exchange: Exchange) -> None:
        nonlocal limited
        if limited:
            limited = False
            await exchange.json_answer(
                429, {"error": {"type": "rate_limit_error", "message": "no"}}, retry_after="30"
            )
        else:
            await healthy(exchange)

    primary, backup = FakeUpstream(primary_handler), FakeUpstream(healthy)
    routes = [{"match": "gpt", "targets": ["primary/m"], "alternatives": ["backup/m"]}]
    async with live_gateway({"primary": primary, "backup": backup}, routes) as gw:
        with trio.fail_after(60):
            seen = await trio.to_thread.run_sync(browse, gw.url + "/admin/ui", gw.url)
    assert seen["providers"] == ["backup", "primary"]
    assert seen["answer"] == 200
    assert seen["primary_state"] == "blocked"
    assert seen["primary_block"].startswith("m: rate_limited ")  # with its countdown
    assert "served by backup/m" in seen["feed"]
    assert "tried: primary/m: http_429 (429)" in seen["feed"]
    assert seen["serving"] == ["backup/m"]
    assert seen["not_reloaded"] is True
    assert "manual" in seen["manual"] and "from the status page" in seen["manual"]
    assert seen["console"] == []


async def test_the_status_page_asks_a_browser_for_the_admin_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CASCADE_ADMIN", "admin-token-0123456789")
    async with (
        live_gateway(
            {"up": FakeUpstream(healthy)}, server={"admin_token_env": "CASCADE_ADMIN"}
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        r = await client.get("/admin/ui")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="cascade admin"')
        basic = base64.b64encode(b"anyone:admin-token-0123456789").decode()
        r = await client.get("/admin/ui", headers={"authorization": f"Basic {basic}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert b"<script" in r.content and b"src=" not in r.content  # nothing from elsewhere
        wrong = base64.b64encode(b"anyone:nope").decode()
        r = await client.get("/admin/status", headers={"authorization": f"Basic {wrong}"})
        assert r.status_code == 401
        r = await client.get("/admin/status", headers={"authorization": f"Basic {basic}"})
        assert r.status_code == 200


def test_the_page_is_in_the_package() -> None:
    from router.face.admin import STATUS_PAGE

    assert STATUS_PAGE == (Path(__file__).parent.parent / "router/face/status.html").read_bytes()


def watch_a_resume(url: str, gateway: str) -> tuple[str, list[Any]]:
    """The feed's entry for a streamed request whose stream was resumed (runs in a thread)."""
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 15, poll_frequency=0.05)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#providers tr[data-provider]"))
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=gateway) as client:
            client.post("/v1/chat/completions", json=body)
        wait.until(lambda d: "stream resumed" in text(d, "#feed li"))
        console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        return text(driver, "#feed li"), console
    finally:
        driver.quit()


async def test_the_status_page_shows_a_stream_resumed() -> None:
    from tests.test_resume import breaking, continues

    first, second = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["second/m2"],
               "resume": True}]  # fmt: skip
    async with live_gateway({"first": first, "second": second}, routes,
                            {"second": {"dialect": "anthropic"}}) as gw:  # fmt: skip
        with trio.fail_after(60):
            entry, console = await trio.to_thread.run_sync(
                watch_a_resume, gw.url + "/admin/ui", gw.url
            )
    assert "served by second/m2" in entry
    assert "stream resumed: first/m → second/m2 (resumed)" in entry
    assert console == []
