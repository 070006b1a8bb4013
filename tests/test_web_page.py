"""The kit's web page (kit/web/index.html) in a real headless Chromium against `kit serve` on the
demo stick: llama-server serving the page with --path, the real model.

The server listens on loopback only, with an API key as in LAN mode (--key-file): "/" is the one path it serves
without the key, the page takes the key from the URL fragment (as the kit's QR code carries it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, apt_install
from servekit import serving

PAGE = ROOT / "kit" / "web" / "index.html"
PLACEHOLDER = "__KIT_CONFIG__"
STOP = "### Instruction"
CONFIG = {
    "title": "Survival Kit", "model": "gemma-3-270m", "model_name": "Gemma 3 270M (Q4_K_M)", "needs_key": True,
    "disclaimer": "Answers can be wrong; in an emergency reach trained help.",
    "presets": [
        {"id": "general", "name": "General", "system": "You are a helpful assistant. Answer briefly and clearly."},
        {"id": "first-aid", "name": "First aid", "system": "You give short, safe first aid advice."},
    ],
    "default_preset": "general", "max_tokens": 96, "stop": [STOP],
}
ANSWER_TIMEOUT = 180  # two slow CPU cores: the page streams at the model's pace


def fill(config: dict) -> str:
    """The page with its settings in, exactly as kit serve writes it."""
    from kit.serve import page_html

    return page_html(config)


# ---- the file itself (fast) ----

def test_page_is_one_small_self_contained_file():
    html = PAGE.read_text(encoding="utf-8")
    assert len(html.encode()) < 15_000
    assert html.count(PLACEHOLDER) == 1
    assert f'<script id="kit-config" type="application/json">{PLACEHOLDER}</script>' in html
    assert '<meta name="viewport"' in html and '<meta charset="utf-8">' in html
    # no external resource: no src/href/action to another origin, no CSS import or url(), no module import
    assert not re.search(r"""\b(?:src|href|action|srcset|poster)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.I)
    assert not re.search(r"""@import|url\(|\bimport\s*\(|<iframe\b|<img\b""", html, re.I)
    assert not re.search(r"https?://", html, re.I)
    # the one <link>: an empty icon, or the browser asks for /favicon.ico (401 without the key)
    assert re.findall(r"<link\b[^>]*>", html) == ['<link rel="icon" href="data:,">']
    # model output only ever as text
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
    for element_id in ("question", "send", "stop", "answer-list", "disclaimer", "preset", "new-chat",
                       "key-form", "key", "key-submit", "status"):
        assert f'id="{element_id}"' in html


def test_filled_config_stays_json():
    html = fill(dict(CONFIG, disclaimer="</script><script>alert(1)</script>"))
    inside = html.split('<script id="kit-config" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(inside)["disclaimer"] == "</script><script>alert(1)</script>"


# ---- kit serve and Chromium (slow) ----

@dataclass
class Server:
    url: str
    key: str


LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: loopback only


def _get(url: str) -> tuple[int, bytes]:
    try:
        with LOOPBACK.open(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def browser_ready():
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        apt_install("chromium", "chromium-driver")
    import selenium  # noqa: F401  (the test extra: a missing one fails here, in one line)


@pytest.fixture(scope="module")
def server(demo_stick, tmp_path_factory) -> Server:
    """`kit serve` on the demo stick, loopback only, with a key as in LAN mode (--key-file)."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(secrets.token_urlsafe(16) + "\n")
    with serving(demo_stick, "--parallel", "2", "--key-file", str(key_file)) as served:
        assert served.key == key_file.read_text().strip()  # the banner shows the key it serves with
        yield Server(served.base, served.key)


def _artifact(path: Path) -> None:
    folder = os.environ.get("KIT_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)


@pytest.mark.slow
def test_server_serves_only_the_page_without_key(server):
    status, body = _get(server.url + "/")
    assert status == 200 and b'id="answer-list"' in body and PLACEHOLDER.encode() not in body
    assert _get(server.url + "/index.html")[0] == 401  # the key guards every other path, the page's own name too
    assert _get(server.url + "/v1/models")[0] == 401


@pytest.mark.slow
def test_phone_asks_and_streams_an_answer(server, browser_ready, tmp_path):
    from browser import ask, console_errors, open_page, screenshot
    from selenium.webdriver.common.by import By

    with open_page(f"{server.url}/#key={server.key}", width=390, height=844, profile=tmp_path / "chromium") as d:
        assert "key=" not in d.current_url  # read from the fragment, then gone from the address bar
        assert not d.find_element(By.ID, "key-form").is_displayed()
        assert d.find_element(By.ID, "preset").get_attribute("value") == "general"
        answer = ask(d, "How do I purify water?", timeout=ANSWER_TIMEOUT)
        turn = d.find_elements(By.CSS_SELECTOR, "#answer-list .msg[data-role=assistant]")[-1]
        assert turn.get_attribute("data-error") is None, answer
        assert answer.strip(), "the page showed an empty answer"
        assert STOP not in answer
        disclaimer = d.find_element(By.ID, "disclaimer")
        assert disclaimer.is_displayed() and "Answers can be wrong" in disclaimer.text
        box = d.execute_script("var r = arguments[0].getBoundingClientRect();"
                               "return [r.top, r.bottom, window.innerHeight];", disclaimer)
        assert 0 <= box[0] and box[1] <= box[2], f"disclaimer off screen: {box}"
        width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"horizontal scroll: {width}"
        assert width[1] == 390
        shot = screenshot(d, tmp_path / "web-page-phone.png")
        assert not console_errors(d)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000
    _artifact(shot)


@pytest.mark.slow
def test_wrong_key_says_so_and_asks_again(server, browser_ready, tmp_path):
    from browser import ask, open_page
    from selenium.webdriver.common.by import By

    with open_page(f"{server.url}/#key=not-the-key", width=390, height=844, profile=tmp_path / "chromium") as d:
        said = ask(d, "How do I purify water?", timeout=30)
        assert "key is wrong" in said
        form = d.find_element(By.ID, "key-form")
        assert form.is_displayed() and "key is wrong" in d.find_element(By.ID, "key-message").text
        assert d.execute_script("return sessionStorage.getItem('kit-key')") is None
        # the right key in the form, and the question (put back in the box) is answered
        d.find_element(By.ID, "key").send_keys(server.key)
        d.find_element(By.ID, "key-submit").click()
        assert not form.is_displayed()
        assert d.find_element(By.ID, "question").get_property("value") == "How do I purify water?"
        answer = ask(d, "How do I purify water?", timeout=ANSWER_TIMEOUT)
        assert "key is wrong" not in answer and answer.strip()


@pytest.mark.slow
def test_page_loads_nothing_from_elsewhere(server, browser_ready, tmp_path):
    from browser import ask, open_page, screenshot

    with open_page(f"{server.url}/#key={server.key}", width=1280, height=800, mobile=False,
                   profile=tmp_path / "chromium") as d:
        ask(d, "Say hello.", timeout=ANSWER_TIMEOUT)
        origin = d.execute_script("return location.origin")
        names = d.execute_script("return performance.getEntries().map(function (e) { return e.name; })")
        fetched = [n for n in names if re.match(r"[a-z]+://", n)]
        assert f"{origin}/v1/chat/completions" in fetched
        assert all(n.startswith(origin + "/") for n in fetched), fetched
        width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1]
        _artifact(screenshot(d, tmp_path / "web-page-desktop.png"))


@pytest.mark.slow
def test_stop_and_new_conversation(server, browser_ready, tmp_path):
    from browser import assistant_messages, open_page, screenshot, submit, wait_answer, wait_for
    from selenium.webdriver.common.by import By

    with open_page(f"{server.url}/#key={server.key}", width=360, height=640, profile=tmp_path / "chromium") as d:
        before = submit(d, "Write a long story about a river and a village.")
        wait_for(d, lambda d: (assistant_messages(d)[before:] or [None])[0] is not None
                 and assistant_messages(d)[before].get_property("textContent"), timeout=ANSWER_TIMEOUT,
                 what="the first streamed words")
        d.find_element(By.ID, "stop").click()
        wait_answer(d, before, timeout=10)
        assert d.find_element(By.ID, "send").is_enabled()
        assert d.find_element(By.ID, "status").text == "Stopped."
        d.find_element(By.ID, "new-chat").click()
        assert d.find_elements(By.CSS_SELECTOR, "#answer-list .msg") == []
        width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] == 360
        _artifact(screenshot(d, tmp_path / "web-page-360.png"))
