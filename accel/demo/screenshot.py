"""Open the demo in headless Chromium, set the page up, press Run, wait for the results and save a screenshot.

    python -m accel.demo.screenshot docs/demo.png                 # image run on digits-dit (the page's defaults)
    python -m accel.demo.screenshot docs/demo-video.png --video   # video run on moving-digits (delta-dit)

The page is 1366×768 and the screenshot full-page. Uses Playwright with the system's Chromium
(``executable_path``; Playwright's own browser download is not needed). The tests drive the page with the same
function (``tests/test_demo.py``).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from accel.io import atomic_write

from .app import preset_values

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1366, "height": 768}
UI_TIMEOUT_MS = 30_000  # a click or a field; the run itself gets ``timeout_s``
VIDEO_RUN = {"model": "moving-digits", "accelerators": ["delta-dit"], "guidance": 6.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _open(page, accordion: str) -> None:
    """Expand a collapsed accordion (its content is only in the page once open)."""
    if page.eval_on_selector(f"#{accordion} [data-testid=accordion-content]", "e => e.style.display === 'none'"):
        page.click(f"#{accordion} > button.label-wrap")


def _choose(page, element: str, value: str, timeout_ms: float) -> None:
    """Pick ``value`` in a Gradio dropdown, as a user does: open it, click the option."""
    page.click(f"#{element} input[role=combobox]")
    page.click(f"#{element} li[role=option][aria-label='{value}']", timeout=timeout_ms)
    page.wait_for_function(f"document.querySelector('#{element} input').value === '{value}'", timeout=timeout_ms)


def _number(page, element: str, value: float) -> None:
    """Type a value into a slider's number box or a number field and leave it (Gradio reads it on blur). A box
    that has just been rendered (an accordion opened) can take its initial value back: type again until it holds."""
    box = page.locator(f"#{element} input[type=number]").first
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(300)
        if float(box.input_value()) == float(value):
            return
    raise RuntimeError(f"#{element} does not take the value {value}")


def drive(page, run: dict, timeout_ms: float) -> None:
    """Set the page up as ``run`` says (keys: model, class, accelerators, steps, guidance, rounds, presets as
    {method: preset}, fields as {"method-field": value}) and press Run."""
    if "model" in run:
        _choose(page, "model", run["model"], timeout_ms)
    if "class" in run:
        _number(page, "class", run["class"])
    if "accelerators" in run:
        for box in page.query_selector_all("#accelerators input[type=checkbox]"):
            if box.is_checked() != (box.get_attribute("name") in run["accelerators"]):
                box.click()
    if any(key in run for key in ("steps", "guidance", "rounds", "seed")):
        _open(page, "settings")
        for key in ("seed", "steps", "guidance", "rounds"):
            if key in run:
                _number(page, key, run[key])
    for method, preset in run.get("presets", {}).items():
        _open(page, f"{method}-settings")
        _choose(page, f"{method}-preset", preset, timeout_ms)
        for name, value in preset_values(preset).items():  # the boxes now show the preset's values
            page.wait_for_function("([s, v]) => Number(document.querySelector(s).value) === v",
                                   arg=[f"#{method}-{name} input", value], timeout=timeout_ms)
    for element, value in run.get("fields", {}).items():
        _open(page, f"{element.split('-')[0]}-settings")
        _number(page, element, value)
    page.click("#run", timeout=timeout_ms)


def read_page(page) -> dict:
    """What the page shows after a run."""
    def visible(selector: str) -> bool:  # a hidden Gradio component is not in the page at all
        return page.evaluate("s => { const e = document.querySelector(s); return !!e && e.offsetParent !== null; }",
                             selector)

    run = page.eval_on_selector("#run", "e => e.getBoundingClientRect().bottom")
    status = page.eval_on_selector("#status", "e => (e.querySelector('.prose') || e).innerText.trim()")
    return {"status": status, "figures": page.inner_text("#figures"),
            "summary": page.eval_on_selector("#summary", "e => (e.querySelector('.cm-content') || e).innerText"),
            "images": page.eval_on_selector_all("#baseline img, #accelerated img", "els => els.length"),
            "animation": page.eval_on_selector_all("#side-by-side img", "els => els.map(e => e.src)"),
            "frames": page.eval_on_selector_all("#frames img", "els => els.length"),
            "slider_visible": visible("#slider"), "animation_visible": visible("#side-by-side"),
            "class_visible": visible("#class"), "prompt_visible": visible("#prompt"), "run_bottom_px": run}


ENDED = ("s => { const e = document.querySelector('#status .prose') || document.querySelector('#status');"
         " const t = e.innerText.trim(); return /^(Done:|Not run:|The run failed:)/.test(t) && t !== s; }")


def screenshot(path: str | Path | None, *, models=("digits-dit",), run: dict | None = None,
               then: list[dict] = (), chromium: str = CHROMIUM, timeout_s: float = 300) -> dict:
    """Launch the app on localhost, run one comparison in the browser (set up by ``run``, see ``drive``), save a
    full-page PNG at ``path`` (unless None); return what the page showed (``read_page``). Each of ``then`` is a
    further run in the same page (its own settings on top of the first's), read into ``shown["then"]``."""
    from playwright.sync_api import sync_playwright

    from .app import build_demo

    app = build_demo(list(models))
    port = free_port()
    timeout_ms = timeout_s * 1000
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"http://127.0.0.1:{port}/", timeout=timeout_ms)
            page.wait_for_selector("#run", timeout=timeout_ms)
            before = page.eval_on_selector("#run", "e => e.getBoundingClientRect().bottom")
            shown: dict = {}
            for index, settings in enumerate([run or {}, *then]):
                previous = shown.get("status", "")
                drive(page, settings, UI_TIMEOUT_MS)
                page.wait_for_function(ENDED, arg=previous, timeout=timeout_ms)  # done, refused or failed
                now = read_page(page)
                if now["status"].startswith("Done"):
                    images = "#side-by-side img" if now["animation_visible"] else "#baseline img"
                    page.wait_for_selector(images, timeout=timeout_ms)
                    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=timeout_ms)
                    now = read_page(page)
                if index == 0:
                    shown = {**now, "run_bottom_px": before, "then": []}  # where Run is as the page opens
                    if path is not None:
                        page.mouse.move(0, 0)
                        atomic_write(path, page.screenshot(full_page=True))
                else:
                    shown["then"].append(now)
            browser.close()
    finally:
        app.close()
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--video", action="store_true", help="a video run on moving-digits (Δ-DiT, guidance 6)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: the page's 20)")
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args(argv)
    run = dict(VIDEO_RUN) if args.video else {}
    if args.steps:
        run["steps"] = args.steps
    models = ("digits-dit", "moving-digits") if args.video else ("digits-dit",)
    print(screenshot(args.path, models=models, run=run, chromium=args.chromium, timeout_s=600))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
