"""Headless Chromium for tests of the kit's web page (kit/web/index.html).

Debian's `chromium` and `chromium-driver` packages, driven by Selenium through the system
chromedriver: the driver path is given, so Selenium Manager never runs (and never goes online).
Chromium resolves no host name but loopback (--host-resolver-rules), uses no proxy and none of
Google's background services. Every wait is bounded; the browser is killed even when a test fails.

    with open_page(url, width=390, height=844, profile=tmp_path / "chromium") as driver:
        answer = ask(driver, "How do I purify water?", timeout=120)
        screenshot(driver, tmp_path / "page.png")
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# The page's element contract (see the comment at the top of kit/web/index.html).
ASSISTANT = "#answer-list .msg[data-role=assistant]"


def chromium_args(width: int, height: int, profile: Path) -> list[str]:
    args = [
        "--headless=new", "--disable-gpu", f"--window-size={width},{height}", f"--user-data-dir={profile}",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
        "--no-pings", "--no-proxy-server", "--disable-features=Translate,MediaRouter,OptimizationHints",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        "--password-store=basic", "--use-mock-keychain",
    ]
    if os.geteuid() == 0:  # Chromium's sandbox refuses to run as root
        args.append("--no-sandbox")
    return args


def _pids_using(profile: Path) -> list[int]:
    """Processes (ours: the profile folder is this test's own) whose command line names the profile."""
    needle = f"--user-data-dir={profile}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_leftovers(service, profile: Path) -> None:
    proc = getattr(service, "process", None)
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # chromedriver leads its own session (start_new_session)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
    for pid in _pids_using(profile):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids_using(profile) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def open_page(url: str, *, width: int = 390, height: int = 844, profile: Path, mobile: bool = True,
              load_timeout: float = 30) -> Iterator:
    """A headless Chromium showing `url` in a width x height CSS px viewport (a phone's, with the
    page's viewport meta honoured, when `mobile`); `profile` is a throwaway folder (under tmp_path).
    Yields the Selenium driver; on exit the browser and its driver are gone, whatever happened."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in chromium_args(width, height, profile):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile / "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(load_timeout)
        driver.set_script_timeout(load_timeout)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        driver.get(url)
        wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete",
                 timeout=load_timeout, what="the page to load")
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        _kill_leftovers(service, profile)


def wait_for(driver, condition, *, timeout: float, what: str):
    """condition(driver) until truthy (returned), at most `timeout` seconds; the assertion names `what`."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"waited {timeout:.0f} s for {what}") from None


def assistant_messages(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ASSISTANT)


def submit(driver, question: str) -> int:
    """Type the question and press Enter; returns how many assistant turns there were before."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(assistant_messages(driver))
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question, Keys.ENTER)
    return before


def wait_answer(driver, before: int, *, timeout: float):
    """The assistant turn after the first `before` ones, once its stream ended (data-done="true")."""
    def ended(d):
        turns = assistant_messages(d)
        if len(turns) > before and turns[before].get_attribute("data-done") == "true":
            return turns[before]
        return None

    return wait_for(driver, ended, timeout=timeout, what="the answer to end (data-done=true)")


def ask(driver, question: str, timeout: float = 120) -> str:
    """Ask through the page as a person would (type, Enter) and return the answer's text."""
    return wait_answer(driver, submit(driver, question), timeout=timeout).get_property("textContent")


def screenshot(driver, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"no screenshot written to {path}")
    return path


def console_errors(driver) -> list[str]:
    """The page's console messages at level SEVERE (JavaScript errors, failed loads)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
