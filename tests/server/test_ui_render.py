"""The chat page against a scripted API (ui_fake_api.py) in headless Chromium: what the embedded
model cannot be made to say. HTML and javascript: links in a streamed answer render as text,
reasoning_content is a collapsible block, UTF-8 cut between network writes arrives whole, an error
event keeps the partial answer and shows the server's message, LoRA adapters are offered."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.ui_browser import console_errors, open_browser, screenshot, wait_for
from tests.server.ui_fake_api import (CHINESE, ERROR_MESSAGE, FAKE_ADAPTER, FAKE_MODEL, PARTIAL_BEFORE_ERROR,
                                      REASONING, FakeAPI)

LAST = "#thread .msg.assistant:last-child"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAPI]:
    api = FakeAPI()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def page(fake: FakeAPI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    web = open_browser(tmp_path_factory.mktemp("chromium-fake") / "profile")
    web.get(fake.url("/"))
    wait_for(lambda: web.find_elements("css selector", "#model option"), 30, "the model list")
    yield web
    web.quit()


def ask(web: Any, text: str) -> Any:
    """Sends text in a new conversation; the finished answer's element."""
    web.find_element("id", "new-chat").click()
    web.find_element("id", "prompt").send_keys(text)
    web.find_element("id", "send").click()
    wait_for(lambda: web.execute_script("return !document.querySelector('#thread .msg.pending')"), 30, "the answer")
    return web.find_element("css selector", LAST)


def test_lora_adapters_are_offered_and_sent(page: Any, fake: FakeAPI) -> None:
    options = page.execute_script("return [...document.querySelectorAll('#model option')].map(o => "
                                  "[o.value, o.parentElement.tagName, o.parentElement.label || ''])")
    assert options == [[FAKE_MODEL, "SELECT", ""], [FAKE_ADAPTER, "OPTGROUP", "LoRA adapters"]]
    page.execute_script(f"const s = document.getElementById('model'); s.value = '{FAKE_ADAPTER}';"
                        "s.dispatchEvent(new Event('change'));")
    ask(page, "hello")
    body = fake.requests[-1]
    assert body["model"] == FAKE_ADAPTER and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["temperature"] == 0.7 and body["top_p"] == 1  # the page's defaults, sent as numbers
    page.execute_script(f"const s = document.getElementById('model'); s.value = '{FAKE_MODEL}';"
                        "s.dispatchEvent(new Event('change'));")


def test_system_prompt_and_sampling_fields_are_sent(page: Any, fake: FakeAPI) -> None:
    page.find_element("id", "settings-toggle").click()
    for field, value in (("system-prompt", "Answer in one word."), ("temperature", "0.2"), ("top-p", "0.9"),
                         ("max-tokens", "33")):
        page.find_element("id", field).clear()
        page.find_element("id", field).send_keys(value)
    ask(page, "hi")
    body = fake.requests[-1]
    assert body["messages"] == [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.9, 33)
    page.find_element("id", "reset-settings").click()
    page.find_element("id", "settings-toggle").click()
    ask(page, "hi")
    body = fake.requests[-1]
    assert body["messages"] == [{"role": "user", "content": "hi"}] and "max_tokens" not in body


def test_html_and_javascript_links_in_an_answer_render_as_text(page: Any) -> None:
    answer = ask(page, "xss")
    content = answer.find_element("css selector", ".content")
    text = content.text
    for literal in ("<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">',
                    "[click me](javascript:window.__xss=3)", "<b>not bold</b>", "<i>x</i>"):
        assert literal in text, (literal, text)
    counts = page.execute_script("""const c = arguments[0];
        return [c.querySelectorAll('script, img, b, i, iframe').length, c.querySelectorAll('a').length,
                c.querySelectorAll('pre code').length, c.querySelectorAll('strong').length,
                c.querySelectorAll('li').length, window.__xss === undefined]""", content)
    assert counts == [0, 1, 1, 1, 2, True], counts
    link = content.find_element("css selector", "a")
    assert link.get_attribute("href") == "https://example.org/docs" and link.text == "safe"
    assert "noopener" in link.get_attribute("rel") and link.get_attribute("target") == "_blank"
    assert answer.find_element("css selector", ".meta").text.startswith("TTFT")
    assert "11 prompt + 7 completion tokens" in answer.find_element("css selector", ".meta").text
    assert not [e for e in console_errors(page) if "Content Security Policy" in e or "Uncaught" in e]
    screenshot(page, "render-html-as-text")


def test_markdown_subset(page: Any) -> None:
    content = ask(page, "markdown").find_element("css selector", ".content")
    shape = page.execute_script("""const c = arguments[0], q = (s) => [...c.querySelectorAll(s)];
        return {h3: q('h3').map(e => e.textContent), links: q('a').map(e => e.href),
                quote: q('blockquote em').map(e => e.textContent), ol: q('ol').map(e => e.start),
                nested: q('ol > li > ul > li').map(e => e.textContent), cells: q('td').map(e => e.textContent),
                tdCode: q('td code').length, hr: q('hr').length, code: q('pre code').map(e => e.textContent)}""", content)
    assert shape == {"h3": ["Title"], "links": ["https://example.org/a_b"], "quote": ["text"], "ol": [3],
                     "nested": ["nested"], "cells": ["1", "2"], "tdCode": 1, "hr": 1,
                     "code": ["print('unclosed fence')"]}, shape
    assert "[data](data:text/html,<b>x</b>)" in content.text  # not a link: data: URLs are text


def test_reasoning_is_a_collapsible_block(page: Any) -> None:
    answer = ask(page, "reasoning")
    details = answer.find_element("css selector", "details.reasoning")
    assert details.get_attribute("open") is None  # collapsed once the answer has started
    assert details.find_element("css selector", "summary").text == "Reasoning"
    details.find_element("css selector", "summary").click()
    assert details.find_element("css selector", ".reasoning-body").text == "".join(REASONING)  # <b> as text
    assert answer.find_element("css selector", ".content").text == "The answer is 42."
    assert answer.find_element("css selector", ".content strong").text == "42"
    screenshot(page, "render-reasoning")


def test_utf8_cut_between_network_writes_arrives_whole(page: Any) -> None:
    answer = ask(page, "chinese")
    assert answer.find_element("css selector", ".content").text == CHINESE


def test_an_answer_cut_by_max_tokens_says_so(page: Any) -> None:
    assert "max tokens reached" in ask(page, "long").find_element("css selector", ".meta").text
    assert "max tokens reached" not in ask(page, "short").find_element("css selector", ".meta").text


def test_an_error_event_keeps_the_partial_answer(page: Any) -> None:
    answer = ask(page, "error")
    assert answer.find_element("css selector", ".content").text == PARTIAL_BEFORE_ERROR
    assert answer.find_element("css selector", ".msg-error").text == ERROR_MESSAGE  # the server's words, as text
    chats = json.loads(page.execute_script("return localStorage.getItem('gantry.chats.v1')"))
    message = next(c for c in chats["list"] if c["messages"] and c["messages"][0]["content"] == "error")["messages"][1]
    assert message["content"] == PARTIAL_BEFORE_ERROR and message["error"] == ERROR_MESSAGE


def test_regenerate_and_copy(page: Any, fake: FakeAPI) -> None:
    answer = ask(page, "again")
    sent = len(fake.requests)
    answer.find_element("css selector", ".regenerate").click()
    wait_for(lambda: len(fake.requests) == sent + 1, 10, "the regenerated request")
    wait_for(lambda: page.execute_script("return !document.querySelector('#thread .msg.pending')"), 30, "the answer")
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "again"}]  # the old answer is not sent
    assert len(page.find_elements("css selector", "#thread .msg")) == 2
    button = page.find_element("css selector", f"{LAST} .copy")
    button.click()
    wait_for(lambda: button.text == "Copied", 5, "the copy confirmation")
