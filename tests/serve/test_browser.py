"""The page in a real browser: `shpeft serve` in a subprocess, headless Chromium drives it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import artifacts_dir, chromium, console_errors, images_decoded, require_browser

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve(runs: dict[str, Path], log: Path) -> Iterator[str]:
    """``shpeft serve`` on a free loopback port; yields its URL, stops it afterwards."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    args = [f"{name}={path}" for name, path in runs.items()]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shpeft.cli", "serve", "--runs", *args, "--port", "0",
             "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+/)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"shpeft serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def predict_all(url: str, path: Path) -> dict:
    """``POST /predict`` from Python, to compare with what the page shows."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"'
            f"\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "predict", data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


@pytest.mark.slow
def test_page_shows_every_task_with_a_heat_map(runs, images, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = images["benign.png"]
    with serve(runs, tmp_path / "server.log") as url, chromium(1500, 1000) as driver:
        expected = {p["task"]: p["prediction"] for p in predict_all(url, image)["predictions"]}
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "summary").text.startswith("5 task(s)"))
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .pred")) == len(runs))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card img.heat")) == len(runs))
        wait.until(lambda d: not images_decoded(d))
        shown = {
            card.get_attribute("data-task"): card.find_element(By.CSS_SELECTOR, ".pred").text
            for card in driver.find_elements(By.CSS_SELECTOR, ".card")
        }
        assert list(shown) == list(runs)
        for task, text in shown.items():
            assert text.startswith(expected[task] + " "), (task, text)
            assert re.fullmatch(r".+ \d+\.\d%", text)
        assert driver.find_element(By.ID, "status").text == f"{image.name}: 5 task(s) done"
        assert console_errors(driver) == []
        driver.save_screenshot(str(artifacts_dir() / "serve_page.png"))

        # a file that is not an image: the server's sentence is shown, the page keeps working
        notes = tmp_path / "notes.txt"
        notes.write_text("not pixels")
        driver.find_element(By.ID, "file").send_keys(str(notes))
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == (
            "the file 'notes.txt' is not an image (PNG, JPEG, TIFF, BMP or DICOM)"
        )
        errors = console_errors(driver)
        assert len(errors) == 1 and "status of 415" in errors[0], errors
        driver.save_screenshot(str(artifacts_dir() / "serve_page_error.png"))
