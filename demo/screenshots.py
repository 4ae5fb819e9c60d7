"""Take the documentation screenshots: serve the demo on a model, drive each panel in headless Chromium, save PNGs.

    python demo/screenshots.py [MODEL_FOLDER] [--out docs] [--word science] [--sentence "..."] [--prompt "..."]

Writes ``demo-senses.png``, ``demo-explain.png``, ``demo-steer-sense.png`` and ``demo-steer-topic.png`` to
``--out`` and prints what each panel showed. Needs selenium and Debian's chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from selenium.webdriver.common.by import By

from backpack.words import load_model
from backpack_demo.app import DEFAULT_MODEL, build_app, launch
from backpack_demo.browser import (
    assert_no_traceback,
    choose,
    click,
    fill,
    open_tab,
    outside_requests,
    screenshot,
    set_slider,
    start_chromium,
    text_of,
    value_of,
    wait_for,
)


def steer(driver, button: str, status_marker: str, label: str, path: Path) -> None:
    """Run one Steer comparison, print both generations and save the screenshot."""
    click(driver, button)
    wait_for(driver, lambda d: status_marker in text_of(d, "#steer-status"), f"the {label} steering", timeout=600)
    print(f"\n[Steer: {label}]", text_of(driver, "#steer-status"), "without: " + value_of(driver, "steer-plain"),
          "with:    " + value_of(driver, "steer-steered"), sep="\n  ")
    print(" ->", screenshot(driver, path))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    parser.add_argument("--name", default="", help="the model's name on the page (default: the folder)")
    parser.add_argument("--word", default="science")
    parser.add_argument("--sentence", default="The history of science is")
    parser.add_argument("--position", type=int, default=-1)
    parser.add_argument("--target", default="", help="explained word (default: the likeliest next token)")
    parser.add_argument("--prompt", default="The history of")
    parser.add_argument("--steer-word", default="science")
    parser.add_argument("--steer-sense", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.0)
    parser.add_argument("--topic", default="sports")
    parser.add_argument("--strength", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=30)
    return parser.parse_args(argv)


def rows_text(driver, table_id: str) -> list[str]:
    """Each row of an HTML table in the page, as one line of text."""
    return [row.text.replace("\n", " ") for row in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


def tour(driver, url: str, args: argparse.Namespace, out: Path) -> None:
    """Visit each panel with the arguments' inputs, print what it shows and save a screenshot of it."""
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sense-word textarea"), "the page to render")
    print(text_of(driver, "#model-info"))

    fill(driver, "sense-word", args.word)
    click(driver, "sense-button")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sense-table"), "the sense grid")
    print("\n[Senses]", text_of(driver, "#sense-status"), *rows_text(driver, "sense-table"), sep="\n  ")
    print(" ->", screenshot(driver, out / "demo-senses.png"))

    open_tab(driver, "Explain")
    fill(driver, "explain-text", args.sentence)
    fill(driver, "explain-position", args.position)
    fill(driver, "explain-target", args.target)
    click(driver, "explain-button")
    wait_for(driver, lambda d: "Target" in text_of(d, "#explain-status"), "the explanation")
    print("\n[Explain]", text_of(driver, "#explain-status"), "next words:", *rows_text(driver, "next-table"),
          "contributions:", *rows_text(driver, "contribution-table"), sep="\n  ")
    print(" ->", screenshot(driver, out / "demo-explain.png"))

    open_tab(driver, "Steer")
    fill(driver, "steer-prompt", args.prompt)
    set_slider(driver, "steer-tokens", args.new_tokens)
    fill(driver, "steer-word", args.steer_word)
    fill(driver, "steer-sense", args.steer_sense)
    set_slider(driver, "steer-scale", args.scale)
    steer(driver, "steer-sense-button", "Sense ", "sense", out / "demo-steer-sense.png")

    choose(driver, "steer-topic", args.topic)
    set_slider(driver, "steer-strength", args.strength)
    steer(driver, "steer-topic-button", "Topic bag", "topic", out / "demo-steer-topic.png")

    assert_no_traceback(driver)
    print("\nresources loaded from outside the demo's server:", outside_requests(driver, url) or "none")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model)
    app = build_app(model, tokenizer, name=args.name or args.model)
    url = launch(app, block=False)
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = start_chromium(profile)
            try:
                tour(driver, url, args, Path(args.out))
            finally:
                driver.quit()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
