"""End-to-end test of the browser demo (demo/app.py): a real page in headless Chromium, driven through Selenium.

A tiny random Backpack with GPT-2's vocabulary is served on a free loopback port; the test types a word, a
sentence and a prompt, checks what the page shows (and that bad input gives a message, not a traceback), checks
that the page loaded nothing from outside the machine, and saves one screenshot per panel to
``$BACKPACK_ARTIFACTS/demo/`` (default ``outputs/test-artifacts/demo/``, ignored by git).

Needs gradio, selenium and Debian's ``chromium`` + ``chromium-driver`` (no browser is downloaded). Without them
the test is skipped, unless ``BACKPACK_REQUIRE_BROWSER=1`` (then it fails).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("BACKPACK_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BACKPACK_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
NUM_SENSES = 4
N_POSITIONS = 64
WAIT_S = 60  # generous: CI machines are small and shared


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


_REASON = _missing()
if _REASON is not None:
    if os.environ.get("BACKPACK_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser test required but cannot run: {_REASON}")
    pytest.skip(_REASON, allow_module_level=True)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for (or download) drivers

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from backpack.tokenizer import gpt2_tokenizer  # noqa: E402
from configuration_backpack_gpt2 import BackpackGPT2Config  # noqa: E402
from demo.app import build_app, launch  # noqa: E402
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
    "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter", "--window-size=1400,1000",
)


def artifact_dir() -> Path:
    """Where screenshots go: $BACKPACK_ARTIFACTS/demo, default outputs/test-artifacts/demo (git-ignored)."""
    root = Path(os.environ.get("BACKPACK_ARTIFACTS", REPO_ROOT / "outputs" / "test-artifacts"))
    path = root / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    """The demo on a tiny random Backpack (GPT-2 vocabulary, 4 senses), served in a background thread."""
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=NUM_SENSES, n_positions=N_POSITIONS,
                                vocab_size=50264)
    model = BackpackGPT2LMHeadModel(config).eval()
    app = build_app(model, gpt2_tokenizer(), name="tiny-random", topic_sample_size=256)
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield url
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    """Headless Debian Chromium with a fresh profile and no background networking."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# --- page helpers --------------------------------------------------------------------------------------------


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], what: str, timeout: float = WAIT_S):
    """`condition`'s first truthy value, or a failure that names `what` and shows the page's text."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"timed out waiting for {what}; the page shows:\n{body[:3000]}")


def text_of(driver: WebDriver, css: str) -> str:
    """The visible text of the first element matching `css` ('' if none)."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def replace_text(box: WebElement, value: str) -> None:
    """Select all, delete, type: real key events, so the page's input handlers see the change (clear() does not)."""
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if value:
        box.send_keys(value)


def fill(driver: WebDriver, elem_id: str, value: str) -> None:
    """Replace the text of the Gradio textbox `elem_id`."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    replace_text(box, value)


def set_number(driver: WebDriver, elem_id: str, value: float) -> None:
    """Set the Gradio number box `elem_id` (and let Gradio see the change)."""
    replace_text(driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input"), str(value))


def click(driver: WebDriver, elem_id: str) -> None:
    driver.find_element(By.ID, elem_id).click()


def open_tab(driver: WebDriver, label: str) -> None:
    """Click the tab button labelled `label`."""
    button = driver.find_element(By.XPATH, f"//button[@role='tab'][contains(normalize-space(.), '{label}')]")
    button.click()


def screenshot(driver: WebDriver, name: str) -> Path:
    """A full-page PNG (beyond the window, through the DevTools protocol) under the artifact directory."""
    wait_for(driver, lambda d: d.execute_script("return [...document.images].every(i => i.complete)"),
             "the page's images to load")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})
    path = artifact_dir() / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def assert_no_traceback(driver: WebDriver) -> None:
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and 'File "' not in body, body[:2000]


# --- the test ------------------------------------------------------------------------------------------------


def test_demo_in_browser(app_url: str, browser: WebDriver) -> None:
    driver = browser
    driver.get(app_url)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sense-word textarea, #sense-word input"),
             "the page to render")
    assert "4 senses" in text_of(driver, "#model-info")

    # Senses: a word -> one row per sense with top and bottom words.
    fill(driver, "sense-word", "river")
    click(driver, "sense-button")
    wait_for(driver, lambda d: "'river'" in text_of(d, "#sense-status"), "the sense grid")
    rows = driver.find_elements(By.CSS_SELECTOR, "#sense-table tbody tr")
    assert len(rows) == NUM_SENSES
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == [str(s) for s in range(NUM_SENSES)]
    assert all(len(row.find_elements(By.CSS_SELECTOR, ".bp-top")) == 6 for row in rows)
    assert all(len(row.find_elements(By.CSS_SELECTOR, ".bp-bottom")) == 6 for row in rows)
    screenshot(driver, "senses")

    fill(driver, "sense-word", "")
    click(driver, "sense-button")
    wait_for(driver, lambda d: "please enter a word" in text_of(d, "#sense-status"), "the empty-word message")
    assert not driver.find_elements(By.CSS_SELECTOR, "#sense-table")
    assert_no_traceback(driver)

    # Explain: a sentence -> next-word table, α heatmap, contribution table and heatmap.
    open_tab(driver, "Explain")
    fill(driver, "explain-text", "The river bank was covered in")
    set_number(driver, "explain-position", 2)
    fill(driver, "explain-target", "water")
    click(driver, "explain-button")
    wait_for(driver, lambda d: "Target 'water'" in text_of(d, "#explain-status"), "the explanation")
    status = text_of(driver, "#explain-status")
    assert "after position 2 (' bank')" in status and "sum of" in status
    assert len(driver.find_elements(By.CSS_SELECTOR, "#next-table tbody tr")) == 10
    contributions = driver.find_elements(By.CSS_SELECTOR, "#contribution-table tbody tr")
    assert len(contributions) == 10  # 4 senses x 3 context words >= 10 rows
    positions = {row.find_elements(By.TAG_NAME, "td")[1].text for row in contributions}
    assert positions <= {"0", "1", "2"}  # only words up to the query position contribute
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-alpha img"), "the α heatmap")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-contrib-plot img"), "the contribution plot")
    screenshot(driver, "explain")

    fill(driver, "explain-text", "word " * (N_POSITIONS + 10))
    click(driver, "explain-button")
    wait_for(driver, lambda d: f"reads at most {N_POSITIONS}" in text_of(d, "#explain-status"), "the too-long message")
    assert_no_traceback(driver)

    # Steer: a prompt -> two generations, without and with a sense intervention, then a topic.
    open_tab(driver, "Steer")
    fill(driver, "steer-prompt", "The river bank")
    fill(driver, "steer-word", "river")
    set_number(driver, "steer-sense", 1)
    click(driver, "steer-sense-button")
    wait_for(driver, lambda d: "Sense 1 of 'river'" in text_of(d, "#steer-status"), "the sense-steered generations")
    plain = driver.find_element(By.CSS_SELECTOR, "#steer-plain textarea").get_property("value")
    steered = driver.find_element(By.CSS_SELECTOR, "#steer-steered textarea").get_property("value")
    assert plain.startswith("The river bank") and len(plain) > len("The river bank")
    assert steered.startswith("The river bank") and len(steered) > len("The river bank")

    click(driver, "steer-topic-button")
    wait_for(driver, lambda d: "Topic bag" in text_of(d, "#steer-status"), "the topic-steered generations")
    assert "' sports'" in text_of(driver, "#steer-status")
    assert driver.find_element(By.CSS_SELECTOR, "#steer-steered textarea").get_property("value").startswith(
        "The river bank")
    screenshot(driver, "steer")

    set_number(driver, "steer-sense", 99)
    click(driver, "steer-sense-button")
    wait_for(driver, lambda d: "out of range" in text_of(d, "#steer-status"), "the bad-sense message")
    fill(driver, "steer-prompt", "")
    click(driver, "steer-topic-button")
    wait_for(driver, lambda d: "please enter a prompt" in text_of(d, "#steer-status"), "the empty-prompt message")
    assert_no_traceback(driver)

    # Nothing was fetched from outside this machine (fonts, scripts, CDNs).
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    host = app_url.split("//", 1)[1].split("/", 1)[0]
    outside = [r for r in resources if not r.startswith(("data:", "blob:")) and f"//{host}" not in r]
    assert not outside, outside


def test_errors_become_messages() -> None:
    """A toolkit ValueError is an input problem; anything else an internal error; never a traceback."""
    from demo.app import shows_errors

    def bad_input(word):
        raise ValueError(f"unknown word {word!r}")

    def broken(word):
        raise KeyError(word)

    assert shows_errors(2)(bad_input)("zz") == (None, "⚠️ **Input problem:** unknown word 'zz'")
    cleared, message = shows_errors(2)(broken)("zz")
    assert cleared is None and message.startswith("⚠️ **Internal error** (KeyError)") and "Traceback" not in message


def test_missing_default_model_is_explained(tmp_path, monkeypatch, capsys) -> None:
    """Without the nano export, the command says how to make one instead of failing."""
    from demo import app

    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "outputs" / "nano" / "model")
    assert app.main([]) == 2
    assert "bash scripts/quickstart.sh" in capsys.readouterr().err
