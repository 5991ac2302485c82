"""Screenshots of the page with a model: the example prompt generated, and Auto-fix on the example with a typo.

    python recipes/page-screenshots.py [MODEL] [OUT_DIR]     # default: the embedded model, docs/img

Needs Debian's chromium (`make browser`) and playwright (dev extras). Prints the generated text and the fixed
code, so the screenshots can be checked against what the API returned.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

import unmask
from unmask.serve.app import create_app
from unmask.serve.runner import BackgroundServer

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main(model: str | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe = unmask.load(model)
    name = Path(model).name if model else "default"
    with BackgroundServer(create_app(pipe, model_name=name)) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(srv.url + "/")
        page.wait_for_selector("#server-status.ok", timeout=60_000)
        page.fill("#max_tokens", "96")
        page.fill("#frame_delay", "0")
        page.click("#go")  # the page's own example prompt
        page.wait_for_selector("#gen-output[data-state=done]", timeout=600_000)
        print("generated:\n" + page.text_content("#canvas"))
        page.locator("#gen-output").screenshot(path=str(out / "page-generate.png"))
        page.click("#edit-auto")  # Auto-fix on the page's example with `len(vaules)`
        page.wait_for_selector("#edit-output[data-state=done]", timeout=600_000)
        print("auto-fix:\n" + page.text_content("#edit-canvas"))
        page.screenshot(path=str(out / "page-autofix.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img"))
