"""Open the demo in headless Chromium, press Run, wait for both outputs and save a screenshot.

    python -m accel.demo.screenshot docs/demo.png [--chromium /usr/bin/chromium]

Uses Playwright with the system's Chromium (``executable_path``; Playwright's own browser download is not needed).
The test suite runs the same function (``tests/test_demo.py``).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from accel.io import atomic_write

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def screenshot(path: str | Path, *, models=("digits-dit",), chromium: str = CHROMIUM, timeout_s: float = 120) -> dict:
    """Launch the app on localhost, run one comparison in the browser, save a PNG; return what the page showed."""
    from playwright.sync_api import sync_playwright

    from .app import build_demo

    app = build_demo(list(models))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", timeout=timeout_s * 1000)
            page.click("#run button, button#run", timeout=timeout_s * 1000)
            page.wait_for_selector("#baseline img", timeout=timeout_s * 1000)
            page.wait_for_selector("#accelerated img", timeout=timeout_s * 1000)
            page.wait_for_function("document.querySelector('#figures').innerText.includes('speedup')",
                                   timeout=timeout_s * 1000)
            shown = {"figures": page.inner_text("#figures"),
                     "images": page.eval_on_selector_all("#baseline img, #accelerated img", "els => els.length")}
            atomic_write(path, page.screenshot(full_page=True))
            browser.close()
    finally:
        app.close()
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args(argv)
    print(screenshot(args.path, chromium=args.chromium))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
