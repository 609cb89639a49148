"""The web page at ``/``, in headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

``make test`` installs both where they are missing (see the Makefile's ``browser`` target).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from recscale.config import TrainConfig
from recscale.service import ServiceSettings, create_app
from recscale.testing import block_log, serve_in_thread, write_tiny_dataset
from recscale.train import train

pytestmark = pytest.mark.browser

KEY = "page-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_tiny_dataset(tmp_path_factory.mktemp("data") / "blocks", block_log(valid=True))
    config = TrainConfig(
        model="ials", split="given", epochs=1, device="cpu", progress=False, num_threads=1
    )
    params = {"factors": 4, "regularization": 0.1, "alpha": 10.0}
    run_dir = tmp_path_factory.mktemp("runs") / "ials"
    train(data, config, params, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def url(run_dir: Path) -> Iterator[str]:
    with serve_in_thread(create_app(ServiceSettings(run=str(run_dir), api_key=KEY))) as base:
        while httpx.get(f"{base}/readyz").status_code != 200:
            time.sleep(0.05)
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    assert CHROMIUM and CHROMEDRIVER, (
        "headless Chromium is needed: apt-get install chromium chromium-driver (make test does)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # this machine has no network beyond loopback: nothing may phone home
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver: object, css: str, count: int, timeout: float = 15) -> list:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{css}: {len(found)} elements after {timeout}s, expected {count}")


def test_the_page_shows_history_and_recommendations_then_similar_items(
    browser: object, url: str, run_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    browser.find_element(By.ID, "key").send_keys(KEY)
    user = browser.find_element(By.ID, "user")
    user.send_keys("u9")
    browser.find_element(By.CSS_SELECTOR, "#pick button").click()

    recs = _wait(browser, "#recs li.item", 10)
    expected = httpx.get(
        f"{url}/v1/users/u9/recommendations?k=10", headers={"X-API-Key": KEY}
    ).json()["items"]
    assert [li.get_attribute("data-id") for li in recs] == [item["id"] for item in expected]
    assert recs[0].find_element(By.CLASS_NAME, "title").text == "Item 9"
    history = _wait(browser, "#history li.item", 5)
    assert sorted(li.get_attribute("data-id") for li in history) == [
        "i10",
        "i11",
        "i6",
        "i7",
        "i8",
    ]
    assert browser.find_element(By.ID, "status").text == ""

    shot = tmp_path / "recommendations.png"
    browser.save_screenshot(str(shot))
    _assert_text_drawn(shot, browser.find_element(By.ID, "recs"))

    recs[0].click()  # Item 9: its neighbours appear in the third panel
    similar = _wait(browser, "#similar li.item", 10)
    got = httpx.get(f"{url}/v1/items/i9/similar?k=10", headers={"X-API-Key": KEY}).json()
    assert [li.get_attribute("data-id") for li in similar] == [i["id"] for i in got["items"]]
    assert "Item 9" in browser.find_element(By.ID, "similar-note").text


def test_the_page_reports_a_wrong_key_and_flags_an_unknown_user(browser: object, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")  # forget the key the last test typed
    browser.get(f"{url}/?user=someone-new")
    status = browser.find_element(By.ID, "status")
    deadline = time.monotonic() + 15
    while "401" not in status.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "401" in status.text and "X-API-Key" in status.text  # no key typed in yet
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#pick button").click()
    _wait(browser, "#recs li.item", 10)
    assert "unknown user: popular" in browser.find_element(By.ID, "fallback").text


def _assert_text_drawn(png: Path, element: object) -> None:
    """The element's part of the screenshot holds dark text pixels: the list was painted."""
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)[..., :3]
    box = element.rect
    region = pixels[
        int(box["y"]) : int(box["y"] + box["height"]), int(box["x"]) : int(box["x"] + box["width"])
    ]
    assert region.size, box
    dark = np.mean(region.mean(axis=2) < 0.5)
    assert dark > 0.02, f"only {dark:.1%} dark pixels where the recommendations are"
