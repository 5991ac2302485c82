"""The demo page in headless Chromium: a prompt is submitted, the denoising animation shows masked states
turning into text, the final text appears; then an Instant Edit of a selected region.

Needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` package (dev extras); Playwright
never downloads a browser here, it drives /usr/bin/chromium.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from conftest import tiny_model
from unmask.decoding.options import DecodeOptions
from unmask.decoding.policies import POLICIES
from unmask.pipeline import Pipeline
from unmask.serve.app import create_app
from unmask.serve.runner import BackgroundServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent; install it with `apt-get install -y chromium`"),
]


def test_page_animates_denoising_and_edits(tiny_pipeline, tmp_path):
    from playwright.sync_api import sync_playwright

    # slow each forward pass a little so the page receives its states over time, as with a real model
    hook = tiny_pipeline.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    app = create_app(tiny_pipeline, model_name="tiny")
    try:
        with BackgroundServer(app) as srv, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1366, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#server-status.ok", timeout=15_000)
            assert "tiny" in page.inner_text("#model")
            # the policy menu and each policy's inputs come from GET /v1/policies
            assert page.eval_on_selector_all("#policy option", "os => os.map(o => o.value)") == list(POLICIES)
            assert page.input_value("#policy") == "threshold" and page.is_visible("#threshold")
            page.select_option("#policy", "eb")
            assert page.is_visible("#entropy_bound") and not page.is_visible("#threshold")

            # --- generate: fixed policy, 24 tokens in 12 steps -> 12 animated states
            page.fill("#prompt", "def parse_header(line):\n")
            page.fill("#max_tokens", "24")
            page.select_option("#policy", "fixed")
            page.fill("#steps", "12")
            page.fill("#block_length", "24")
            page.fill("#frame_delay", "30")
            page.click("#go")
            page.wait_for_function("window.unmaskLog.some(f => f.panel === 'generate' && f.masked > 0)",
                                   timeout=60_000)
            page.screenshot(path=str(tmp_path / "denoising.png"))
            page.wait_for_selector("#gen-output[data-state=done]", timeout=60_000)
            log = page.evaluate("window.unmaskLog.filter(f => f.panel === 'generate')")
            assert len(log) == 12, log
            middle = [f for f in log if 0 < f["masked"] < f["total"]]
            assert middle, "no intermediate masked state was drawn"
            assert log[0]["masked"] > log[-1]["masked"] == 0
            assert [f["step"] for f in log] == sorted(f["step"] for f in log)

            # the final text on the page is the API's answer for the same request
            api = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "prompt": "def parse_header(line):\n", "max_tokens": 24, "steps": 12, "block_length": 24,
                "policy": "fixed", "threshold": 0.9, "temperature": 0}).json()
            final = api["choices"][0]["text"]
            assert page.inner_text("#canvas") == final.replace("\r\n", "\n") or page.text_content("#canvas") == final
            assert page.locator("#canvas .tok.masked").count() == 0
            assert page.inner_text("#c-nfe") == "12" and page.inner_text("#c-tps") not in ("–", "")
            # each token carries the probability it was committed with: an underline and a tooltip
            scored = page.locator("#canvas .tok.scored")
            assert scored.count() > 0 and "% sure when committed" in scored.first.get_attribute("title")
            page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)

            # --- Instant Edit: select a region of the text and rewrite it
            text = page.input_value("#edit-input")
            start = text.index("vaules")
            page.evaluate(f"(() => {{ const t = document.getElementById('edit-input'); t.focus();"
                          f" t.setSelectionRange({start}, {start + 6}); t.dispatchEvent(new Event('select')); }})()")
            assert "selection" in page.inner_text("#selection")
            page.click("#edit-span")
            page.wait_for_selector("#edit-output[data-state=done]", timeout=60_000)
            edit_log = page.evaluate("window.unmaskLog.filter(f => f.panel === 'edit')")
            assert edit_log and any(f["masked"] > 0 for f in edit_log)
            edited = page.text_content("#edit-canvas")
            assert edited.startswith(text[:start]) and edited.endswith(text[start + 6:])
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        hook.remove()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_selection_after_an_emoji_edits_the_selected_characters(tiny_pipeline):
    """A textarea counts UTF-16 units (two per emoji), the server counts characters: the span sent must be
    in characters, or everything after an emoji is edited one position off."""
    from playwright.sync_api import sync_playwright

    text = "# 🙂 🙂 averages\ndef average(values):\n    return sum(values) / len(vaules)\n"
    start = text.index("vaules")  # in characters; the textarea's offset is start + 2
    app = create_app(tiny_pipeline, model_name="tiny")
    with BackgroundServer(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_selector("#server-status.ok", timeout=15_000)
        page.fill("#edit-input", text)
        page.evaluate("(() => { const t = document.getElementById('edit-input'), s = t.value.indexOf('vaules');"
                      " t.focus(); t.setSelectionRange(s, s + 6); t.dispatchEvent(new Event('select')); })()")
        assert f"selection {start}–{start + 6}" in page.inner_text("#selection")
        page.click("#edit-span")
        page.wait_for_selector("#edit-output[data-state=done]", timeout=60_000)
        edited = page.text_content("#edit-canvas")
        browser.close()
    assert edited.startswith(text[:start]) and edited.endswith(text[start + 6:]), edited


def confirmed_drafts(url: str, body: dict) -> list[int]:
    """Positions a verify decoding confirmed from drafts, read from the API's diffusing stream: what each
    step committed beyond its first (leftmost) token."""
    drafted: set[int] = set()
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "diffusing": True}) as res:
        for line in res.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            choices = json.loads(line[5:]).get("choices") or [{}]
            diffusion = choices[0].get("diffusion")
            if diffusion:
                drafted.update(sorted(diffusion.get("changed") or [])[1:])
    return sorted(drafted)


def test_verify_marks_confirmed_drafts_instead_of_confidence(tokenizer):
    """Under verify every token is the model's own greedy choice: a confidence underline says nothing, so the
    page underlines the tokens confirmed from a draft (committed in one step with the token before them)."""
    from playwright.sync_api import sync_playwright

    body = {"prompt": "def parse_header(line):\n", "max_tokens": 24, "block_length": 8, "policy": "verify",
            "temperature": 0}
    drafting = tiny_model(tokenizer, attention="block_causal", block_size=8, block_attention="causal",
                          logits_shift=True)  # causal inside its blocks, as an adapted AR model: verify applies
    app = create_app(Pipeline(drafting, tokenizer), model_name="tiny",
                     defaults=DecodeOptions(policy="verify", block_length=8))
    with BackgroundServer(app) as srv, sync_playwright() as pw:
        expected = confirmed_drafts(srv.url, body)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_selector("#server-status.ok", timeout=15_000)
        # the model's recommended decoding is what the settings show
        assert (page.input_value("#policy"), page.input_value("#block_length")) == ("verify", "8")
        page.fill("#prompt", body["prompt"])
        page.fill("#max_tokens", "24")
        page.fill("#frame_delay", "0")
        page.click("#go")
        page.wait_for_selector("#gen-output:not([data-state=running])", timeout=60_000)
        assert page.get_attribute("#gen-output", "data-state") == "done", page.inner_text("#gen-error")
        assert page.locator("#canvas .tok.scored").count() == 0  # no confidence underline
        assert page.is_visible("#legend-verify") and not page.is_visible("#legend-confidence")
        drafted = page.eval_on_selector_all(
            "#canvas .tok", "ts => ts.flatMap((t, i) => t.classList.contains('drafted') ? [i] : [])")
        tokens_per_step = page.inner_text("#c-tpstep")
        browser.close()
    assert expected and drafted == expected, (drafted, expected)
    assert tokens_per_step not in ("–", "") and not errors, errors
