"""The built-in chat page (issue 18) on a live server with the embedded SmolLM2 and an API key:
its routes and headers over HTTP, then a headless Chromium through every acceptance line (key,
streamed answer, Stop aborting on the server, theme, reload, XSS as text, Chinese intact), with
screenshots (light and dark, desktop and phone width) under tests/artifacts/ui/."""
from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.server.ui_routes import UI_DIR
from tests.server.conftest import MODEL, LiveServer, launch, wait_ready
from tests.server.ui_browser import PHONE, DESKTOP, console_errors, open_browser, screenshot, set_size, wait_for

ASSETS = sorted(p.name for p in UI_DIR.iterdir())
XSS = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">',
       '[click me](javascript:window.__xss=3)']
CHINESE_PROMPT = "请用中文回答：中国的首都是哪里？"
# The page's own state, read in the browser.
THREAD_TEXT = "return document.getElementById('thread').innerText"
ANSWERS = "return [...document.querySelectorAll('#thread .msg.assistant .content')].map(e => e.innerText)"


# ---- over HTTP ----

def test_page_and_assets_are_public_with_security_headers(keyed_server: LiveServer) -> None:
    for path in ["/", "/ui", *(f"/ui/{name}" for name in ASSETS)]:
        r = httpx.get(keyed_server.url(path), timeout=10)  # no key
        assert r.status_code == 200, (path, r.text)
        csp = r.headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]*)", csp)[1]
        assert script_src == "'self'" and "unsafe-inline" not in csp, csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        if path.startswith("/ui/"):
            assert r.content == (UI_DIR / path.removeprefix("/ui/")).read_bytes()
    index = httpx.get(keyed_server.url("/"), timeout=10)
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    again = httpx.get(keyed_server.url("/"), headers={"If-None-Match": index.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and not again.content


def test_page_has_no_inline_script_or_handler_and_no_remote_url() -> None:
    html = (UI_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "inline style"
    for name in ASSETS:
        text = (UI_DIR / name).read_text()
        assert not re.search(r"(src|href)\s*=\s*\"(https?:)?//", text), f"{name} loads from another origin"
        assert ".innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, name


def test_status_route_follows_the_key_rule(keyed_server: LiveServer) -> None:
    r = httpx.get(keyed_server.url("/ui/status"), timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(keyed_server.url("/ui/status"), headers=keyed_server.headers, timeout=10)
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["status"] == "ready" and status["model"] == MODEL
    assert status["max_model_len"] == 1024
    assert status["num_requests_running"] == 0 and status["num_requests_waiting"] == 0
    assert 0 <= status["kv_cache_usage"] <= 1


def test_ui_routes_have_the_request_size_limit(keyed_server: LiveServer) -> None:
    """A body beyond max_request_body_bytes (8 MiB here) is refused on the page's route as on the API's."""
    limit = 8 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limit + 1) + b"x" * 65536)
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    long_url = "/ui?" + "a" * 20000
    assert httpx.get(keyed_server.url(long_url), timeout=10).status_code == 414


def test_disable_ui_turns_the_page_off(tmp_path: Path) -> None:
    """The page, its files and its status are gone; / says how to turn it back on."""
    server = wait_ready(launch(tmp_path, "--disable-ui"))
    try:
        r = httpx.get(server.url("/"), timeout=10)
        assert r.status_code == 404 and "--disable-ui" in r.json()["error"]["message"], r.text
        assert "content-security-policy" not in r.headers
        assert httpx.get(server.url("/ui/app.js"), timeout=10).status_code == 404
        assert httpx.get(server.url("/ui/status"), timeout=10).status_code == 404
    finally:
        assert server.stop() == 0, server.log()[-2000:]


def test_readme_shows_the_page_and_how_to_open_it() -> None:
    repo = UI_DIR.parents[2]
    readme = (repo / "README.md").read_text()
    shot = re.search(r"!\[[^\]]*\]\((docs/[\w.-]+\.png)\)", readme)
    assert shot and (repo / shot[1]).read_bytes().startswith(b"\x89PNG"), "README's screenshot of the page"
    assert "http://localhost:8000/" in readme and "--disable-ui" in readme


@pytest.mark.parametrize("target", ["local", "docker", "slurm", "k8s"])
def test_launcher_server_ui_renders_into_every_target(target: str, tmp_path: Path) -> None:
    from engine.config import load_config_file
    from tests.launcher.conftest import render

    extra = ["deploy.python=python3"] if target == "local" else ["model=tiny-llama"]
    for ui in ("true", "false"):
        files = render([f"deploy={target}", f"server.ui={ui}", *extra])
        (tmp_path / "engine.yaml").write_text(files["engine.yaml"])
        assert load_config_file(str(tmp_path / "engine.yaml"))[1].ui is (ui == "true")
        if target == "k8s":  # the pods read engine.yaml from the ConfigMap
            assert files["engine.yaml"].strip() in files["k8s/configmap.yaml"].replace("\n    ", "\n")


# ---- in the browser ----

@pytest.fixture(scope="module")
def page(keyed_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    web = open_browser(tmp_path_factory.mktemp("chromium") / "profile")
    web.get(keyed_server.url("/"))
    yield web
    web.quit()


def by_id(web: Any, element_id: str) -> Any:
    return web.find_element("id", element_id)


def set_field(web: Any, element_id: str, value: str) -> None:
    if not by_id(web, "settings").is_displayed():
        by_id(web, "settings-toggle").click()
    field = by_id(web, element_id)
    field.clear()
    field.send_keys(value)


def ask(web: Any, text: str) -> None:
    by_id(web, "prompt").send_keys(text)
    by_id(web, "send").click()


def wait_answer(web: Any, count: int, timeout: float = 120) -> str:
    """The text of the count-th answer once it has finished."""
    done = "return document.querySelectorAll('#thread .msg.assistant:not(.pending)').length"
    wait_for(lambda: web.execute_script(done) >= count, timeout, f"answer {count}")
    return web.execute_script(ANSWERS)[count - 1]


def stored_chats(web: Any) -> dict[str, Any]:
    return json.loads(web.execute_script("return localStorage.getItem('gantry.chats.v1')"))


def test_key_is_asked_and_a_wrong_one_shows_the_servers_error(page: Any, keyed_server: LiveServer) -> None:
    dialog = wait_for(lambda: by_id(page, "key-dialog").is_displayed() and by_id(page, "key-dialog"), 30, "the key dialog")
    by_id(page, "key-input").send_keys("not-the-key")
    by_id(page, "key-submit").click()
    error = wait_for(lambda: by_id(page, "key-error").text, 30, "the key error")
    assert error == "invalid or missing API key: send `Authorization: Bearer <key>`"  # the server's words
    assert dialog.is_displayed()
    by_id(page, "key-input").clear()
    by_id(page, "key-input").send_keys(keyed_server.api_key)
    by_id(page, "key-submit").click()
    wait_for(lambda: not dialog.is_displayed(), 30, "the dialog to close")
    # The status strip: model, context, running, waiting, KV cache from /ui/status.
    wait_for(lambda: page.find_elements("id", "status-model"), 30, "the status strip")
    assert by_id(page, "status-model").text == MODEL and by_id(page, "status-context").text == "1,024 tokens"
    assert by_id(page, "status-kv").text.endswith("%")
    assert wait_for(lambda: by_id(page, "model").get_attribute("value"), 30, "the model list") == MODEL
    # The key lives in this tab's sessionStorage only.
    assert page.execute_script("return sessionStorage.getItem('gantry.apiKey')") == keyed_server.api_key
    local = page.execute_script("return JSON.stringify(Object.assign({}, localStorage))")
    assert keyed_server.api_key not in local


def test_streamed_answer_with_its_statistics(page: Any) -> None:
    set_field(page, "temperature", "0")
    set_field(page, "max-tokens", "48")
    # Every text the answer shows while it streams, recorded in the page.
    page.execute_script("""
        window.__partials = [];
        new MutationObserver(() => {
          const a = document.querySelector('#thread .msg.assistant.pending .content');
          if (a && !a.querySelector('.typing')) window.__partials.push(a.innerText);
        }).observe(document.getElementById('thread'), {childList: true, subtree: true, characterData: true});""")
    ask(page, "What is the capital of France?")
    answer = wait_answer(page, 1)
    assert "Paris" in answer
    partials = {p for p in page.execute_script("return window.__partials") if p.strip()}
    assert len(partials) >= 2 and all(answer.startswith(p.rstrip()) for p in partials), partials  # it streamed
    meta = page.find_element("css selector", "#thread .msg.assistant .meta").text
    assert re.search(r"TTFT \d+\.\d\d s", meta) and re.search(r"\d+\.\d tok/s", meta), meta
    usage = re.search(r"(\d+) prompt \+ (\d+) completion tokens", meta)
    assert usage and int(usage[1]) > 10 and 1 <= int(usage[2]) <= 48, meta


@pytest.mark.exclusive  # the abort must land within 1 s of the click
def test_stop_aborts_the_request_on_the_server(page: Any, keyed_server: LiveServer) -> None:
    set_field(page, "temperature", "0.8")
    set_field(page, "max-tokens", "800")
    ask(page, "Write a very long story about a dragon who learns to cook, with many chapters.")
    partial = "return (document.querySelector('#thread .msg.assistant.pending .content') || {}).innerText"
    wait_for(lambda: len(page.execute_script(partial) or "") > 20, 120, "the long answer to stream")
    assert keyed_server.metric("gantry:num_requests_running") == 1  # mid-stream
    stop = by_id(page, "stop")
    clicked = time.monotonic()
    stop.click()
    wait_for(lambda: keyed_server.metric("gantry:num_requests_running") == 0, 5, "running requests to drop to 0")
    elapsed = time.monotonic() - clicked
    assert elapsed < 1.0, f"running requests dropped to 0 only {elapsed:.2f}s after Stop"
    wait_for(lambda: by_id(page, "send").is_displayed(), 10, "Send to come back")
    meta = page.find_elements("css selector", "#thread .msg.assistant .meta")[-1].text
    assert "stopped" in meta
    assert keyed_server.wait_idle()[("gantry:kv_cache_usage_perc", ())] == 0


def test_theme_switch_reload_and_screenshots(page: Any) -> None:
    html = "return document.documentElement.getAttribute('data-theme')"
    background = "return getComputedStyle(document.body).backgroundColor"
    first, first_bg = page.execute_script(html), page.execute_script(background)
    by_id(page, "theme").click()
    second = page.execute_script(html)
    assert {first, second} == {"light", "dark"} and page.execute_script(background) != first_bg
    page.refresh()
    wait_for(lambda: page.find_elements("id", "status-model"), 30, "the status strip after reload")
    assert page.execute_script(html) == second  # the theme is remembered
    assert not by_id(page, "key-dialog").is_displayed()  # the key too, for this tab
    text = page.execute_script(THREAD_TEXT)
    assert "What is the capital of France?" in text and "Paris" in text  # the conversation is still there
    # Screenshots: both themes, desktop and phone width.
    for theme in ("light", "dark"):
        if page.execute_script(html) != theme:
            by_id(page, "theme").click()
        set_size(page, DESKTOP)
        screenshot(page, f"chat-{theme}-desktop")
        set_size(page, PHONE)
        sidebar_right = "return document.getElementById('sidebar').getBoundingClientRect().right"
        wait_for(lambda: page.execute_script(sidebar_right) <= 0, 5, "the conversations to leave the phone's screen")
        assert by_id(page, "menu").is_displayed()
        screenshot(page, f"chat-{theme}-phone")
    by_id(page, "menu").click()  # the conversations come back as a drawer
    wait_for(lambda: page.execute_script("return document.getElementById('sidebar').getBoundingClientRect().left") == 0,
             5, "the drawer to open")
    screenshot(page, "chat-dark-phone-drawer")
    from selenium.webdriver.common.action_chains import ActionChains

    scrim = by_id(page, "scrim")  # tapped beside the drawer, it closes the drawer
    ActionChains(page).move_to_element_with_offset(scrim, scrim.size["width"] // 2 - 20, 0).click().perform()
    wait_for(lambda: page.execute_script(sidebar_right) <= 0, 5, "the drawer to close")
    set_size(page, DESKTOP)
    by_id(page, "theme").click()  # back to light
    assert not [e for e in console_errors(page) if "Content Security Policy" in e or "Uncaught" in e]


def test_user_text_with_html_renders_as_text(page: Any) -> None:
    by_id(page, "new-chat").click()
    set_field(page, "max-tokens", "16")
    text = " ".join(XSS)
    ask(page, text)
    wait_answer(page, 1)
    assert page.find_element("css selector", "#thread .msg.user .user-text").text == text
    assert page.execute_script("return document.querySelectorAll('#thread img, #thread script').length") == 0
    assert page.execute_script("return document.querySelectorAll('#thread a[href^=\"javascript\"]').length") == 0
    assert page.execute_script("return window.__xss") is None


def test_chinese_streams_intact(page: Any, keyed_server: LiveServer) -> None:
    by_id(page, "new-chat").click()
    set_field(page, "temperature", "0")
    set_field(page, "max-tokens", "40")
    ask(page, CHINESE_PROMPT)
    wait_answer(page, 1)
    shown = stored_chats(page)["list"]
    chat = next(c for c in shown if c["messages"] and c["messages"][0]["content"] == CHINESE_PROMPT)
    streamed = chat["messages"][1]["content"]
    # The same greedy request without streaming: the page's text must be exactly that.
    body = {"model": MODEL, "messages": [{"role": "user", "content": CHINESE_PROMPT}], "temperature": 0,
            "top_p": 1, "max_tokens": 40}
    r = httpx.post(keyed_server.url("/v1/chat/completions"), json=body, headers=keyed_server.headers, timeout=120)
    expected = r.json()["choices"][0]["message"]["content"]
    assert streamed == expected and re.search(r"[\u4e00-\u9fff]", streamed), (streamed, expected)
    thread = page.execute_script(THREAD_TEXT)
    assert "\ufffd" not in thread and CHINESE_PROMPT in thread
    titles = [e.text for e in page.find_elements("css selector", "#conversations .conversation-title")]
    assert len(shown) == 3 and titles[0].startswith(CHINESE_PROMPT[:8]), titles  # several conversations kept
    screenshot(page, "chat-chinese-desktop")
