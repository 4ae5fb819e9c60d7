"""End-to-end test of the browser demo (demo/app.py): a real page in headless Chromium, driven through Selenium.

A tiny random Backpack with GPT-2's vocabulary is served on a free loopback port; the test types a word, a
sentence and a prompt, checks what the page shows (and that bad input gives a message, not a traceback), checks
that the page loaded nothing from outside the machine, and saves one screenshot per panel to
``$BACKPACK_ARTIFACTS/demo/`` (default ``outputs/test-artifacts/demo/``, ignored by git).

Needs gradio, selenium (the `[dev]` extra) and Debian's ``chromium`` + ``chromium-driver`` (no browser is
downloaded; `.ci/run` installs them). Without them the browser test fails, saying what is missing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from backpack.tokenizer import gpt2_tokenizer
from backpack_demo.app import build_app, launch
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_SENSES = 4
N_POSITIONS = 64


def artifact_dir() -> Path:
    """Where screenshots go: $BACKPACK_ARTIFACTS/demo, default outputs/test-artifacts/demo (git-ignored)."""
    root = Path(os.environ.get("BACKPACK_ARTIFACTS", REPO_ROOT / "outputs" / "test-artifacts"))
    return root / "demo"


def _free_port() -> int:
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
    with torch.no_grad():  # larger weights than the initialisation's, so that predictions are far from uniform
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "wpe" not in name:
                parameter.mul_(8.0)
    app = build_app(model, gpt2_tokenizer(), name="tiny-random", topic_sample_size=256)
    url = launch(app, host="127.0.0.1", port=_free_port(), block=False)
    try:
        yield url
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium with a fresh profile and no background networking."""
    from backpack_demo.browser import missing_browser, start_chromium

    reason = missing_browser()
    if reason is not None:
        pytest.fail(f"the browser test cannot run: {reason}")
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver, name: str) -> None:
    """Save a full-page screenshot as <artifact directory>/<name>.png."""
    from backpack_demo.browser import screenshot

    screenshot(driver, artifact_dir() / f"{name}.png")


# --- the test ------------------------------------------------------------------------------------------------


def test_demo_in_browser(app_url: str, browser) -> None:
    """Type a word, a sentence and a prompt; check each panel's output and the messages for bad input."""
    from selenium.webdriver.common.by import By

    from backpack_demo.browser import (
        assert_no_traceback,
        click,
        fill,
        open_tab,
        outside_requests,
        text_of,
        value_of,
        wait_for,
    )

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
    shoot(driver, "senses")

    fill(driver, "sense-word", "")
    click(driver, "sense-button")
    wait_for(driver, lambda d: "please enter a word" in text_of(d, "#sense-status"), "the empty-word message")
    assert not driver.find_elements(By.CSS_SELECTOR, "#sense-table")
    assert_no_traceback(driver)

    # Explain: a sentence -> next-word table, α heatmap, contribution table and heatmap.
    open_tab(driver, "Explain")
    fill(driver, "explain-text", "The river bank was covered in")
    fill(driver, "explain-position", 2)
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
    shoot(driver, "explain")

    fill(driver, "explain-text", "word " * (N_POSITIONS + 10))
    click(driver, "explain-button")
    wait_for(driver, lambda d: f"reads at most {N_POSITIONS}" in text_of(d, "#explain-status"), "the too-long message")
    assert_no_traceback(driver)

    # Steer: a prompt -> two generations, without and with a sense intervention, then a topic.
    open_tab(driver, "Steer")
    fill(driver, "steer-prompt", "The river bank")
    fill(driver, "steer-word", "river")
    fill(driver, "steer-sense", 1)
    click(driver, "steer-sense-button")
    wait_for(driver, lambda d: "Sense 1 of 'river'" in text_of(d, "#steer-status"), "the sense-steered generations")
    plain, steered = value_of(driver, "steer-plain"), value_of(driver, "steer-steered")
    assert plain.startswith("The river bank") and len(plain) > len("The river bank")
    assert steered.startswith("The river bank") and len(steered) > len("The river bank")

    click(driver, "steer-topic-button")
    wait_for(driver, lambda d: "Topic bag" in text_of(d, "#steer-status"), "the topic-steered generations")
    assert "' sports'" in text_of(driver, "#steer-status")
    assert value_of(driver, "steer-steered").startswith("The river bank")
    shoot(driver, "steer")

    fill(driver, "steer-sense", 99)
    click(driver, "steer-sense-button")
    wait_for(driver, lambda d: "out of range" in text_of(d, "#steer-status"), "the bad-sense message")
    fill(driver, "steer-prompt", "")
    click(driver, "steer-topic-button")
    wait_for(driver, lambda d: "please enter a prompt" in text_of(d, "#steer-status"), "the empty-prompt message")
    assert_no_traceback(driver)

    # Nothing was fetched from outside this machine (fonts, scripts, CDNs).
    assert not outside_requests(driver, app_url)


def test_errors_become_messages() -> None:
    """A toolkit ValueError is an input problem; anything else an internal error; never a traceback."""
    from backpack_demo.app import shows_errors

    def bad_input(word):
        raise ValueError(f"unknown word {word!r}")

    def broken(word):
        raise KeyError(word)

    assert shows_errors(2)(bad_input)("zz") == (None, "⚠️ **Input problem:** unknown word 'zz'")
    cleared, message = shows_errors(2)(broken)("zz")
    assert cleared is None and message.startswith("⚠️ **Internal error** (KeyError)") and "Traceback" not in message


def test_missing_default_model_is_explained(tmp_path, monkeypatch, capsys) -> None:
    """Without the nano export, the command says how to make one instead of failing."""
    from backpack_demo import app

    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "outputs" / "nano" / "model")
    assert app.main([]) == 2
    assert "bash scripts/quickstart.sh" in capsys.readouterr().err
