"""The web console end to end in headless Chromium (Debian's, driven by Playwright): sign in,
post an edit with its hyperparameters, watch it apply, see the new answer in the playground
beside the old version's, roll back, see the old answer again; open an evaluation report
under the same session. The service runs as its own OS process, in keys mode."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .service_support import ServiceProcess, wait_all_ready

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
FIRST_KEY = re.compile(r"First start: created admin API key (es_\S+)")
# the fact model memorises its answers; a GRACE codebook entry overturns one (see
# test_openai_api.py), so the playground shows a different first word after the edit
GRACE = {"layer": "3", "steps": "200", "lr": "0.5"}


@pytest.fixture
def server(tiny_settings, fact_model_folder, tmp_path) -> Iterator[tuple[ServiceProcess, str]]:
    settings = tiny_settings(model=str(fact_model_folder), auth="keys")
    process = ServiceProcess(settings, "serve", tmp_path / "serve.log", log_level=None).start()
    try:
        wait_all_ready([process])
        [key] = FIRST_KEY.findall(process.log.read_text(errors="replace"))
        yield process, key
    finally:
        process.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _answer(page: Page, prompt: str, version: int) -> tuple[str, str]:
    """The playground's answers (head, `version`) to `prompt`."""
    page.get_by_role("tab", name="Playground").click()
    page.fill("#play-prompt", prompt)
    page.fill("#play-version", str(version))
    page.fill("#play-tokens", "1")
    page.click("#play-submit")  # the answers read "…" until both are in
    expect(page.locator("#play-head")).not_to_have_text(re.compile(r"^(…)?$"))
    expect(page.locator("#play-other-version")).to_have_text(f"({version})")
    return page.inner_text("#play-head").strip(), page.inner_text("#play-other").strip()


def _version(page: Page) -> int:
    return int(page.get_attribute("#model-line", "data-version") or -1)


def test_console_edit_playground_rollback_and_report(server, browser, fact_facts, tmp_path):
    process, key = server
    fact = fact_facts[0]
    prompt = fact["prompt"].format(fact["subject"])
    target = fact["target_new"].split()[0]
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(f"{process.url}/console")

    # a wrong key cannot sign in; the message stands beside the key field
    page.fill("#api-key", "es_000000000000_wrong")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator('[data-error-for="api_key"]')).to_have_text("invalid or revoked API key")
    expect(page.locator("#app-view")).to_be_hidden()

    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#app-view")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("admin")
    [cookie] = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # the API refuses a request without the cookie, and takes the browser's
    assert httpx.get(f"{process.url}/v1/model").status_code == 401
    with_cookie = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    assert httpx.get(f"{process.url}/v1/model", headers=with_cookie).status_code == 200

    head_before, base_before = _answer(page, prompt, 0)
    assert head_before == base_before and head_before.split()[0] != target

    # an out-of-range layer: the API's message appears beside that hyperparameter
    page.get_by_role("tab", name="Edit").click()
    page.select_option("#edit-method", "grace")
    page.click("#hparams-box summary")
    page.fill("#hp-layer", "99")
    page.click("#edit-submit")
    expect(page.locator('[data-error-for="hparams.layer"]')).to_contain_text("layer")
    expect(page.locator("#hp-layer")).to_have_class(re.compile("invalid"))

    page.fill("#edit-prompt", fact["prompt"])
    page.fill("#edit-subject", fact["subject"])
    page.fill("#edit-target", fact["target_new"])
    for name, value in GRACE.items():
        page.fill(f"#hp-{name}", value)
    page.click("#edit-submit")
    expect(page.locator("#edit-outcome")).to_have_text("Applied: the model is at version 1.")
    expect(page.locator("#edit-progress")).to_have_attribute("value", "100")

    head, base = _answer(page, prompt, 0)
    assert head.split()[0] == target and base == base_before
    page.screenshot(path=str(tmp_path / "console-playground.png"), full_page=True)

    # the timeline shows the edit with its diagnostics; roll back to version 0, confirmed
    page.get_by_role("tab", name="Timeline").click()
    expect(page.locator('#versions tr[data-version="1"]')).to_contain_text(
        f"grace: “{prompt}” → {fact['target_new']}"
    )
    page.click('button[data-rollback="0"]')
    page.click("#confirm-ok")
    expect(page.locator('#versions tr[data-version="2"]')).to_contain_text("rollback")
    assert _version(page) == 2
    head_after, _ = _answer(page, prompt, 1)
    assert head_after == head_before

    # an evaluation run started from the console; its report opens under the session
    page.get_by_role("tab", name="Evaluations").click()
    page.fill("#eval-count", "1")
    page.select_option("#eval-method", "grace")
    page.click("#eval-form button[type=submit]")
    row = page.locator("#evaluations tr[data-evaluation]").first
    expect(row).to_contain_text("completed", timeout=300_000)
    with page.context.expect_page() as opened:
        row.get_by_role("link", name="report").click()
    report = opened.value
    report.wait_for_load_state()
    assert "unauthorized" not in report.content()
    expect(report.locator("body")).to_contain_text("counterfact")
    page.screenshot(path=str(tmp_path / "console-evaluations.png"), full_page=True)
    screenshot = Path(tmp_path / "console-playground.png").read_bytes()
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 10_000
