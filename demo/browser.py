"""Drive the demo page in headless Chromium through Selenium: shared by the end-to-end test and demo/screenshots.py.

Uses the system's Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``); nothing is
downloaded (Selenium Manager runs offline), and Chromium's own background traffic is switched off.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for (or download) browsers/drivers

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("BACKPACK_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BACKPACK_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
    "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter", "--window-size=1400,1000",
)
"""Headless, as root in a container, and quiet on the network (no updates, sync or field trials)."""

WAIT_S = 90.0
"""Default wait for the page to answer: generous, CPU machines are small and shared."""


def missing_browser() -> str | None:
    """Why Chromium cannot be driven here (a missing binary), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


def start_chromium(profile_dir: str | Path) -> WebDriver:
    """Headless Chromium with a fresh profile in `profile_dir`."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    return driver


def page_text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], what: str, timeout: float = WAIT_S):
    """`condition`'s first truthy value; AssertionError naming `what` (with the page's text) after `timeout`."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n{page_text(driver)[:3000]}") from None


def text_of(driver: WebDriver, css: str) -> str:
    """The visible text of the first element matching `css` ('' if none)."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def value_of(driver: WebDriver, elem_id: str) -> str:
    """The text inside the Gradio textbox `elem_id`."""
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_property("value")


def replace_text(box: WebElement, value: str) -> None:
    """Select all, delete, type: real key events, so the page's input handlers see the change (clear() does not)."""
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if value:
        box.send_keys(value)


def fill(driver: WebDriver, elem_id: str, value: str | float) -> None:
    """Replace the contents of the Gradio textbox or number box `elem_id`."""
    replace_text(driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"), str(value))


def set_slider(driver: WebDriver, elem_id: str, value: float) -> None:
    """Type `value` into the number field of the Gradio slider `elem_id`, then leave the field."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type='number']")
    replace_text(box, str(value))
    box.send_keys(Keys.TAB)


def choose(driver: WebDriver, elem_id: str, option: str) -> None:
    """Pick `option` in the Gradio dropdown `elem_id` (type it, then Enter)."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    replace_text(box, option)
    box.send_keys(Keys.ENTER)


def click(driver: WebDriver, elem_id: str) -> None:
    driver.find_element(By.ID, elem_id).click()


def open_tab(driver: WebDriver, label: str) -> None:
    """Click the tab button labelled `label`."""
    driver.find_element(By.XPATH, f"//button[@role='tab'][contains(normalize-space(.), '{label}')]").click()


def screenshot(driver: WebDriver, path: str | Path) -> Path:
    """A full-page PNG (beyond the window, through the DevTools protocol), once the page's images have loaded."""
    wait_for(driver, lambda d: d.execute_script("return [...document.images].every(i => i.complete)"),
             "the page's images to load")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def outside_requests(driver: WebDriver, url: str) -> list[str]:
    """Resources the page loaded from anywhere but the demo's own server."""
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    host = url.split("//", 1)[1].split("/", 1)[0]
    return [r for r in resources if not r.startswith(("data:", "blob:")) and f"//{host}/" not in r]


def assert_no_traceback(driver: WebDriver) -> None:
    body = page_text(driver)
    assert "Traceback" not in body and 'File "' not in body, body[:2000]
