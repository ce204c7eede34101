"""A real headless Chromium for the browser tests (Debian's ``chromium`` + ``chromium-driver``).

``.ci/run`` installs the two packages when they are missing; elsewhere a test that needs the
browser skips with the reason. Screenshots go to ``$SHPEFT_TEST_ARTIFACTS`` (default
``runs/test-artifacts/`` in the project), kept after the run as the test's artefacts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def artifacts_dir() -> Path:
    """Where browser tests keep their screenshots (created)."""
    path = Path(os.environ.get("SHPEFT_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_browser() -> None:
    """Skip the calling test when Chromium or its driver is not installed."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[test])")


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A selenium WebDriver on headless Chromium with browser console logging enabled.

    The flags keep Chromium off the network (this machine has none) and out of the user's
    profile; ``driver.get_log("browser")`` returns the console messages.
    """
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="shpeft-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """Console messages of level SEVERE (errors) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def images_decoded(driver) -> list[str]:
    """``src`` (first 60 characters) of every ``<img>`` that did not decode, [] when all did."""
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => (i.getAttribute('src') || '').slice(0, 60));"
    )
