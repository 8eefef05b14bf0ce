"""Headless Chromium for the chat page's tests: Debian's chromium and chromedriver driven by
Selenium 4 (no browser download: Selenium Manager is never asked), a fresh profile per browser,
nothing but loopback. Locally the tests skip without chromium; with CI=true they fail instead."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.infra import procs

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                  "--lang=en-US"]
DESKTOP = (1280, 860)
PHONE = (390, 844)  # CSS pixels of a common phone
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"  # ignored by git; CI keeps it


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) from Debian's packages; skip (locally) or fail (CI=true) without them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if browser and driver:
        return browser, driver
    message = "the chat page's browser test needs Debian's chromium, chromium-driver and selenium: run .ci/infra.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def open_browser(profile_dir: Path, size: tuple[int, int] = DESKTOP) -> Any:
    """A headless Chromium with a fresh profile in profile_dir, window `size` (CSS pixels)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(profile_dir.parent / f"{profile_dir.name}-chromedriver.log"))
    web = webdriver.Chrome(options=options, service=service)
    web.set_script_timeout(30)
    set_size(web, size)
    return web


def set_size(web: Any, size: tuple[int, int]) -> None:
    """The viewport (not the window) at `size`, so that a phone width is a phone width."""
    web.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600})


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    """predicate()'s first truthy value, polled quickly (a page reacts in milliseconds)."""
    return procs.wait_for(predicate, timeout, what, interval=interval)


def screenshot(web: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    web.save_screenshot(str(path))
    return path


def console_errors(web: Any) -> list[str]:
    """The page's console errors so far (a CSP violation, an exception in app.js...)."""
    return [e["message"] for e in web.get_log("browser") if e.get("level") == "SEVERE"]
