"""End to end in a real headless browser (Debian's chromium driven by Playwright): load the page, upload an image,
move the threshold slider; the GMACs shown change and the gate picture is re-rendered. Leaves a screenshot in
test-artifacts/demo.png ($HF_MSVIT_TEST_ARTIFACTS). With HF_MSVIT_DEMO_MODEL=runs/msvit-digits it shows the main job's
model: that screenshot is docs/images/demo.png."""

import os
import re
import shutil

import pytest

from _demo_helpers import artifact_dir


SUMMARY_DONE = """([setting, previous]) => {
    const summary = document.querySelector('#summary');
    const image = document.querySelector('#gate-picture img');
    return summary && new RegExp('gate_threshold=' + setting + '\\\\s').test(summary.innerText)
        && image && image.complete && image.naturalWidth > 0 && (previous === null || image.src !== previous);
}"""


def chromium_or_skip() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "no chromium on PATH: install Debian's browser to run this test (`apt-get install -y chromium`, as root; "
            ".ci/run does it). Playwright's own browser download is not used."
        )
    return browser


def shown_state(page) -> tuple[float, str]:
    summary = page.locator("#summary").inner_text()
    match = re.search(r"([0-9.e+-]+) GMACs for this image", summary)
    assert match, summary
    return float(match.group(1)), page.locator("#gate-picture img").get_attribute("src")


def set_threshold(page, value: str, previous_src: str | None) -> tuple[float, str]:
    """Moves the slider; waits for the summary of that setting and (unless `previous_src` is None) a new picture."""
    page.locator("#threshold input[type=range]").fill(value)
    page.wait_for_function(SUMMARY_DONE, arg=[value, previous_src])
    return shown_state(page)


def test_browser_threshold_slider_moves_gmacs_and_gate_picture(launched_app):
    browser_path = chromium_or_skip()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[demo]'")
    with sync_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=browser_path, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(launched_app.url)
            page.locator("#threshold input[type=range]").fill("0")  # before any image: every region fine
            page.locator("#input-image input[type=file]").set_input_files(str(launched_app.examples[2]))
            page.wait_for_function(SUMMARY_DONE, arg=["0", None])
            gmacs_all, src_all = shown_state(page)
            gmacs_none, src_none = set_threshold(page, "1", src_all)
            assert gmacs_none < gmacs_all and src_none != src_all
            assert page.locator("#labels").inner_text().strip()
            set_threshold(page, "0.5", None)  # the screenshot at the default
            page.screenshot(path=str(artifact_dir() / "demo.png"), full_page=True)
        finally:
            browser.close()
