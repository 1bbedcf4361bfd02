"""`sld-minimal demo` end to end in a real browser: the app on the tiny checkpoint in its own process, driven headless
through Debian's chromium with Playwright. The page may request nothing but the local server; the server is
stopped whatever happens.

Needs the `demo` and `test` extras and /usr/bin/chromium (`.ci/run` installs them); skipped without them, except
under CI (CI=true), where their absence fails.
"""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 60_000


def _require(ok: bool, what: str):
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{what} is needed for the browser test")


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _require(sync_playwright is not None, 'playwright (pip install -e ".[test]")')
    try:
        import gradio  # noqa: F401
    except ImportError:
        _require(False, 'gradio (pip install -e ".[demo]")')
    _require(Path(CHROMIUM).exists(), f"{CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        yield p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(playwright_api, tiny_ckpt, tmp_path_factory):
    """The demo's URL, served by `python -m sld_minimal demo` on a free local port; stopped at the end."""
    tmp = tmp_path_factory.mktemp("demo-server")
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sld_minimal", "demo", "--weights", str(tiny_ckpt),
                             "--port", str(port), "--max-steps", "999"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited ({proc.returncode}): {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer in 120 s: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the demo closes cleanly on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(playwright_api, tmp_path_factory):
    """A headless chromium with a fresh profile that aborts, and records, every request off the loopback."""
    context = playwright_api.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        accept_downloads=True, viewport={"width": 1400, "height": 1000})
    context.outside = []

    def route(r):
        parts = urlsplit(r.request.url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOOPBACK:
            r.continue_()
        else:
            context.outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.on("websocket", lambda ws: urlsplit(ws.url).hostname in LOOPBACK or browser.outside.append(ws.url))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.locator("#compare").wait_for()
    yield page
    page.close()
    assert browser.outside == [], f"the page requested addresses off this machine: {browser.outside}"


def _fill(page, elem_id, value):
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def _pick(page, elem_id, option):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _status(page) -> str:
    return page.locator("#status textarea").input_value()


def _wait_status(page, text):
    page.wait_for_function("t => document.querySelector('#status textarea').value.includes(t)", arg=text,
                           timeout=TIMEOUT_MS)


def _image(page, elem_id):
    """The RGB pixels of the image an Image component shows, fetched from the server."""
    import numpy as np
    from PIL import Image

    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    body = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_compare_shows_both_sides_plots_and_downloads_the_png(page, tmp_path):
    _fill(page, "prompt", "a red apple on a table")
    _pick(page, "preset", "max")  # SLD acts from step 0
    _fill(page, "steps", 8)
    page.locator("#compare").click()
    _wait_status(page, "SLD acted")
    for elem_id in ("sd-image", "sld-image", "difference", "heat"):
        page.locator(f"#{elem_id} img").first.wait_for(state="visible")
    page.locator("#plot img").first.wait_for(state="visible")
    sd, sld = _image(page, "sd-image"), _image(page, "sld-image")
    assert sd.shape == sld.shape == (32, 32, 3) and (sd != sld).any()

    with page.expect_download() as download:
        page.locator("#sld-download").click()
    png = tmp_path / "sld.png"
    download.value.save_as(png)
    from PIL import Image

    parameters = Image.open(png).text["parameters"]
    assert parameters.startswith("a red apple on a table\n") and "Safety: max" in parameters
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    if os.environ.get("SLD_DEMO_SCREENSHOT"):  # how README's notebooks/images/demo.png is made
        shutil.copy(tmp_path / "demo.png", os.environ["SLD_DEMO_SCREENSHOT"])


def test_an_empty_prompt_is_one_line_in_the_page(page):
    _fill(page, "prompt", "   ")
    page.locator("#compare").click()
    _wait_status(page, "Error: Prompt: empty")
    assert "\n" not in _status(page)


def test_cancel_stops_a_long_run_between_steps(page):
    _fill(page, "prompt", "a long run")
    _fill(page, "steps", 999)  # minutes on the tiny model
    start = time.monotonic()
    page.locator("#compare").click()
    page.get_by_text("SD step").first.wait_for()  # the progress bar counts steps
    page.locator("#cancel").click()
    _wait_status(page, "Cancelled: stopped SD at step")
    assert time.monotonic() - start < 45
    step = int(_status(page).split("at step ")[1].split()[0])
    assert 1 <= step < 999


def test_the_guard_sees_a_request_off_the_machine(browser, server):
    """The check above is live: a fetch to an outside address (TEST-NET-1, aborted before it leaves) is recorded."""
    page = browser.new_page()
    try:
        page.goto(server)
        page.evaluate("fetch('http://192.0.2.1/probe').catch(() => null)")  # resolves after the abort
        assert "http://192.0.2.1/probe" in browser.outside
    finally:
        browser.outside.clear()
        page.close()


def test_a_preset_fills_the_sld_values_and_the_seed_button_draws_one(page):
    from playwright.sync_api import expect

    from sld_minimal.app.demo import MAX_SEED

    scale = page.get_by_label("s_S (safety scale)")  # the values' accordion starts open
    _pick(page, "preset", "strong")
    expect(scale).to_have_value("2000")
    expect(scale).to_be_disabled()
    _pick(page, "preset", "custom")
    expect(scale).to_be_enabled()
    page.get_by_role("button", name="Random seed").click()
    expect(page.locator("#seed input")).not_to_have_value("0")
    seed = page.locator("#seed input").input_value()
    assert seed.isdigit() and 0 < int(seed) <= MAX_SEED, seed  # a seed the page's own check accepts


# the JavaScript that tells a field's value, and whether its box cuts it: an input whose text (with the number
# field's spin button) is wider than its box scrolls, scrollWidth > clientWidth
CUT = "e => ({value: e.value, cut: e.scrollWidth > e.clientWidth, label: e.getAttribute('aria-label')})"


@pytest.mark.parametrize("width", [1280, 1400])
def test_every_presets_values_are_shown_in_full(page, width):
    """Each preset's five values (SLD's and SEGA's) in the page's fields, exactly and uncut, from 1280 px wide on."""
    from playwright.sync_api import expect

    from sld_minimal.app.demo import CUSTOM, PRESET_CHOICES, SLD_FIELDS, preset_values, value_labels

    page.set_viewport_size({"width": width, "height": 900})
    for name in [n for n in PRESET_CHOICES if n not in ("off", CUSTOM)]:
        _pick(page, "preset", name)
        expected = [format(v, "g") for v in preset_values(name).values()]  # 0.025 as 0.025, 200.0 as 200
        for key, value in zip(SLD_FIELDS, expected):
            expect(page.locator(f"#value-{key} input")).to_have_value(value, timeout=TIMEOUT_MS)
        shown = [page.locator(f"#value-{key} input").evaluate(CUT) for key in SLD_FIELDS]
        assert shown == [{"value": v, "cut": False, "label": label} for v, label in zip(expected, value_labels(name))]


def test_compare_and_its_outputs_are_in_view_at_1280_by_720(page):
    """On a 1280×720 window, with the page scrolled to its top: the Compare button, and after a run the status and
    all four images, lie inside the window."""
    page.set_viewport_size({"width": 1280, "height": 720})
    _fill(page, "prompt", "a red apple on a table")
    _pick(page, "preset", "max")
    _fill(page, "steps", 4)  # below the fold: filling it scrolls the page
    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#compare").click()  # in view: the click scrolls nothing
    _wait_status(page, "SLD acted")
    for elem_id in ("sd-image", "sld-image", "difference", "heat"):
        page.locator(f"#{elem_id} img").first.wait_for(state="visible")
    assert page.evaluate("window.scrollY") == 0
    for elem_id in ("compare", "status", "sd-image", "sld-image", "difference", "heat"):
        box = page.locator(f"#{elem_id}").bounding_box()
        assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= 1280 and \
            box["y"] + box["height"] <= 720, (elem_id, box)
