"""The browser playground (`GET /`), driven in a real headless Chromium against the real app.

Debian's `chromium` + `chromium-driver` through Selenium, against the session's one `serve run
configs/lance_2stage.yaml` on the tiny checkpoint (tests/serve_server.py, shared with
test_serve_e2e.py). The page is a plain client of the public API, so every result it shows is
checked against the same request sent over HTTP by the test. Screenshots of every tab (and of the
phone-width layout) are written to $LANCE_PLAYGROUND_SCREENSHOTS, default out/playground_screenshots/.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_server import REPO_ROOT, Server

pytestmark = pytest.mark.heavy   # `serve run` of the whole app and a browser

TIMEOUT_S = 300
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600"]
IMAGE_TASKS = ["t2i", "image_edit", "x2t_image", "chat"]


@pytest.fixture(scope="module")
def shots() -> Path:
    path = Path(os.environ.get("LANCE_PLAYGROUND_SCREENSHOTS", REPO_ROOT / "out" / "playground_screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    drv.set_script_timeout(TIMEOUT_S)
    yield drv
    drv.quit()


@pytest.fixture
def page(server: Server, driver):
    """The playground freshly loaded (empty session history), its tabs built from /v1/models."""
    driver.get(f"{server.base_url}/")
    driver.execute_script("sessionStorage.clear();")
    driver.get(f"{server.base_url}/")
    wait_js(driver, "return document.querySelectorAll('[role=tab]').length > 0", "the tabs")
    return driver


# -- helpers ------------------------------------------------------------------------------------------

def wait_js(driver, script: str, what: str, timeout: float = TIMEOUT_S):
    """Poll a JS expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; browser log: {browser_log(driver)}")
        time.sleep(0.1)


def browser_log(driver) -> list:
    try:
        return [e["message"] for e in driver.get_log("browser")]
    except Exception:
        return []


def panel(driver, task: str):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{task}").click()
    p = driver.find_element(By.ID, f"panel-{task}")
    assert p.is_displayed()
    return p


def set_value(driver, task: str, name: str, value) -> None:
    """Type into a knob, as a user does (clear, then keys)."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, f"{task}-{name}")
    if not field.is_displayed():   # a knob under "More knobs"
        driver.execute_script("arguments[0].closest('details').open = true", field)
    field.clear()
    field.send_keys(str(value))


def run_and_wait(driver, task: str) -> str:
    """Click the task's run button and wait until it is idle again; the status line."""
    p = panel(driver, task)
    from selenium.webdriver.common.by import By

    p.find_element(By.CSS_SELECTOR, "button.run").click()
    wait_js(driver, f"return document.getElementById('panel-{task}').getAttribute('aria-busy') === 'false'",
            f"{task} to finish")
    status = p.find_element(By.CSS_SELECTOR, ".status").text
    if not status.startswith("Done in"):   # say why in the assertion that follows
        errors = driver.execute_script(f"""return [...document.querySelectorAll(
            '#panel-{task} .field-error, #panel-{task} .form-error')].filter(e => !e.hidden)
            .map(e => e.id + ': ' + e.textContent)""")
        status += f" {errors}"
    return status


def result_image(driver, task: str) -> tuple[Image.Image, dict]:
    info = driver.execute_script(f"""
        const img = document.querySelector('#panel-{task} .result img');
        const a = document.querySelector('#panel-{task} .result a.download');
        return img && {{src: img.src, w: img.naturalWidth, h: img.naturalHeight,
                        href: a && a.getAttribute('href'), download: a && a.getAttribute('download')}};""")
    assert info, f"no result image in {task}; browser log: {browser_log(driver)}"
    head, b64 = info["src"].split(",", 1)
    assert head == "data:image/png;base64", head
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    assert img.format == "PNG"
    assert (info["w"], info["h"]) == img.size            # the <img> shows that PNG
    assert info["href"] == info["src"] and info["download"].endswith(".png")   # the download link
    return img.convert("RGB"), info


def chat_image_json(body: dict) -> Image.Image:
    url = body["choices"][0]["message"]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def input_png(path: Path, width: int = 120, height: int = 90) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (220, 30, 30)
    Image.fromarray(rgb, "RGB").save(path, format="PNG")
    return path.read_bytes()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def health_jobs(http) -> int | None:
    resp = http.get("/health")
    assert resp.status_code == 200, resp.text
    return resp.json()["dit_jobs"]


def screenshot(driver, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0


# Records the progress bar's values and the result's text lengths as they change.
OBSERVE = """
const panel = document.getElementById(arguments[0]);
window.__seen = {progress: [], text: []};
const bar = panel.querySelector('progress');
new MutationObserver(() => {
  if (bar.hasAttribute('value')) window.__seen.progress.push([bar.value, bar.max]);
}).observe(bar, {attributes: true});
new MutationObserver(() => {
  const answers = panel.querySelectorAll('.output .answer');
  if (answers.length) window.__seen.text.push(answers[answers.length - 1].textContent.length);
}).observe(panel.querySelector('.output'), {subtree: true, childList: true, characterData: true});
"""


# -- the page -----------------------------------------------------------------------------------------

def test_page_is_served_at_root_and_playground_with_nothing_from_elsewhere(server, http, page):
    for path in ("/", "/playground"):
        resp = http.get(path)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in resp.headers["content-security-policy"]
        assert '<script src="playground/app.js"' in resp.text
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = http.get(f"/playground/{asset}")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind)
    missing = http.get("/playground/secrets.txt")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    # every resource the page loaded came from this server (no CDN), and nothing failed
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.base_url) for u in urls), urls
    assert not [m for m in browser_log(page) if "SEVERE" in m or "Refused" in m]


def test_tabs_are_the_tasks_the_server_lists_and_the_tiny_checkpoint_is_announced(http, page, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    lance = http.get("/v1/models").json()["data"][0]["lance"]
    assert lance["tasks"] == IMAGE_TASKS + VIDEO_TASKS   # the tiny checkpoint holds both variants
    tabs = page.execute_script("return [...document.querySelectorAll('[role=tab]')].map(t => t.dataset.task)")
    assert tabs == lance["tasks"]
    banner = page.find_element(By.ID, "tiny-banner")
    assert banner.is_displayed() and "tiny random-weights" in banner.text and "noise" in banner.text
    assert "lance-tiny-random" in page.find_element(By.ID, "model-line").text
    # knobs start at the server's defaults and carry its limits
    defaults = lance["defaults"]
    assert page.find_element(By.ID, "t2i-num_inference_steps").get_attribute("value") == \
        str(defaults["num_inference_steps"])
    assert page.find_element(By.ID, "t2i-size-width").get_attribute("max") == str(lance["max_image_side"])
    assert page.find_element(By.ID, "chat-max_tokens").get_attribute("max") == str(lance["max_model_len"])
    seed = page.find_element(By.ID, "t2i-seed")
    page.find_element(By.CSS_SELECTOR, "#panel-t2i .field-seed button").click()
    assert seed.get_attribute("value") != str(defaults["seed"])
    # keyboard: arrows move between tabs (roving tabindex), each tab shows its panel
    first = page.find_element(By.ID, "tab-t2i")
    first.send_keys(Keys.ARROW_RIGHT)
    assert page.switch_to.active_element.get_attribute("id") == "tab-image_edit"
    assert page.find_element(By.ID, "panel-image_edit").is_displayed()
    assert not page.find_element(By.ID, "panel-t2i").is_displayed()
    page.switch_to.active_element.send_keys(Keys.END)
    assert page.switch_to.active_element.get_attribute("id") == f"tab-{lance['tasks'][-1]}"
    # every control has a label
    unlabeled = page.execute_script("""
        return [...document.querySelectorAll('#panels input, #panels textarea, #panels select')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert unlabeled == []
    for task in lance["tasks"]:
        panel(page, task)
        screenshot(page, shots, f"tab_{task}")


def test_phone_width_layout(page, shots, server):
    """At 390 CSS pixels nothing scrolls sideways and the form and its result stack."""
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        page.get(f"{server.base_url}/")
        wait_js(page, "return document.querySelectorAll('[role=tab]').length > 0", "the tabs")
        for task in IMAGE_TASKS:
            panel(page, task)
            overflow = page.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{task}: the page is {overflow}px wider than the phone screen"
            screenshot(page, shots, f"phone_{task}")
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# -- the tasks ---------------------------------------------------------------------------------------------

def test_text_to_image_progress_reaches_100_and_shows_the_png_of_the_requested_size(http, page, shots):
    from selenium.webdriver.common.by import By

    panel(page, "t2i")
    set_value(page, "t2i", "prompt", "A lighthouse at dusk")
    set_value(page, "t2i", "size-width", 96)
    set_value(page, "t2i", "size-height", 64)
    set_value(page, "t2i", "num_inference_steps", 5)
    set_value(page, "t2i", "seed", 3)
    set_value(page, "t2i", "cfg_text_scale", 3.5)
    page.execute_script(OBSERVE, "panel-t2i")
    status = run_and_wait(page, "t2i")
    assert status.startswith("Done in"), (status, browser_log(page))
    seen = page.execute_script("return window.__seen.progress")
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and {t for _, t in seen} == {5}, seen  # live, step by step
    bar = page.find_element(By.CSS_SELECTOR, "#panel-t2i progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "5"
    assert "100 %" in page.find_element(By.CSS_SELECTOR, "#panel-t2i .progress-text").text
    shown, _ = result_image(page, "t2i")
    assert shown.size == (96, 64)
    # exactly what a client gets for the same request
    resp = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "A lighthouse at dusk"}], "modalities": ["image"],
        "size": "96x64", "num_inference_steps": 5, "seed": 3, "cfg_text_scale": 3.5})
    assert resp.status_code == 200, resp.text[:300]
    assert np.array_equal(np.asarray(shown), np.asarray(chat_image_json(resp.json())))
    # the session history holds it
    history = page.execute_script("return JSON.parse(sessionStorage.getItem('lance-playground.history'))")
    assert len(history) == 1 and history[0]["task"] == "t2i" and history[0]["thumb"]["width"] == 96
    assert page.find_element(By.CSS_SELECTOR, "#history-list img").is_displayed()
    screenshot(page, shots, "result_t2i")


def test_edit_with_an_uploaded_file(http, page, shots, tmp_path):
    from selenium.webdriver.common.by import By

    raw = input_png(tmp_path / "input.png")
    panel(page, "image_edit")
    page.find_element(By.ID, "image_edit-image").send_keys(str(tmp_path / "input.png"))
    wait_js(page, "return document.querySelector('#panel-image_edit .preview img')", "the preview")
    set_value(page, "image_edit", "prompt", "Make the square green")
    page.find_element(By.CSS_SELECTOR, "#image_edit-resolution option[value=image_256res]").click()
    set_value(page, "image_edit", "num_inference_steps", 3)
    set_value(page, "image_edit", "seed", 9)
    status = run_and_wait(page, "image_edit")
    assert status.startswith("Done in"), (status, browser_log(page))
    shown, _ = result_image(page, "image_edit")
    resp = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(raw)}},
            {"type": "text", "text": "Make the square green"}]}],
        "modalities": ["image"], "resolution": "image_256res", "num_inference_steps": 3, "seed": 9})
    assert resp.status_code == 200, resp.text[:300]
    assert np.array_equal(np.asarray(shown), np.asarray(chat_image_json(resp.json())))
    screenshot(page, shots, "result_image_edit")


def test_image_understanding_answer(http, page, shots, tmp_path):
    from selenium.webdriver.common.by import By

    raw = input_png(tmp_path / "photo.png", 100, 140)
    panel(page, "x2t_image")
    page.find_element(By.ID, "x2t_image-image").send_keys(str(tmp_path / "photo.png"))
    set_value(page, "x2t_image", "prompt", "What color is the square?")
    page.find_element(By.CSS_SELECTOR, "#x2t_image-resolution option[value=image_256res]").click()
    set_value(page, "x2t_image", "max_tokens", 12)
    status = run_and_wait(page, "x2t_image")
    assert status.startswith("Done in"), (status, browser_log(page))
    answer = page.find_element(By.CSS_SELECTOR, "#panel-x2t_image .answer").get_attribute("textContent")
    resp = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(raw)}},
            {"type": "text", "text": "What color is the square?"}]}],
        "resolution": "image_256res", "max_tokens": 12, "temperature": 0})
    assert resp.status_code == 200, resp.text[:300]
    expected = resp.json()["choices"][0]["message"]["content"]
    assert expected.strip() and answer == expected
    assert page.find_element(By.CSS_SELECTOR, "#panel-x2t_image a.download").get_attribute("download").endswith(".txt")
    screenshot(page, shots, "result_x2t_image")


def test_chat_answer_is_streamed(http, page, shots):
    from selenium.webdriver.common.by import By

    panel(page, "chat")
    set_value(page, "chat", "prompt", "Tell me about the blue table.")
    set_value(page, "chat", "max_tokens", 24)
    page.execute_script(OBSERVE, "panel-chat")
    status = run_and_wait(page, "chat")
    assert status.startswith("Done in"), (status, browser_log(page))
    turns = page.find_elements(By.CSS_SELECTOR, "#panel-chat .conversation .turn p")
    texts = [t.get_attribute("textContent") for t in turns]
    assert texts[:1] == ["Tell me about the blue table."] and len(texts) == 2
    resp = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Tell me about the blue table."}], "max_tokens": 24,
        "temperature": 0})
    expected = resp.json()["choices"][0]["message"]["content"]
    assert texts[1] == expected
    lengths = page.execute_script("return window.__seen.text")
    partial = sorted({n for n in lengths if 0 < n < len(expected)})
    assert len(partial) >= 2, f"the answer did not arrive in pieces: {lengths}"
    screenshot(page, shots, "result_chat")


# -- errors and Stop ------------------------------------------------------------------------------------------

def test_bad_size_shows_the_servers_message_beside_the_size_field(http, page, shots):
    from selenium.webdriver.common.by import By

    panel(page, "t2i")
    set_value(page, "t2i", "size-width", 72)
    set_value(page, "t2i", "size-height", 64)
    status = run_and_wait(page, "t2i")
    resp = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "modalities": ["image"], "size": "72x64"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "width"
    size_error = page.find_element(By.ID, "t2i-size-error")
    assert size_error.is_displayed() and size_error.text == error["message"], (size_error.text, status)
    assert page.find_element(By.ID, "t2i-size-width").get_attribute("aria-invalid") == "true"
    assert page.find_element(By.ID, "t2i-size-height").get_attribute("aria-invalid") is None   # 64 was fine
    described = page.find_element(By.ID, "t2i-size-width").get_attribute("aria-describedby").split()
    assert "t2i-size-error" in described   # a screen reader reads it with the field
    others = page.execute_script("""return [...document.querySelectorAll('#panel-t2i .field-error, #panel-t2i .form-error')]
        .filter(e => !e.hidden).map(e => e.id || e.className)""")
    assert others == ["t2i-size-error"]
    assert not page.find_elements(By.CSS_SELECTOR, "#panel-t2i .result img")
    screenshot(page, shots, "error_bad_size")


def test_stop_cancels_the_run_on_the_server(http, page, shots):
    """Stop aborts the streaming fetch; the server drops the DiT job (its job table, as /health
    reports it, is empty again long before the run could have finished)."""
    from selenium.webdriver.common.by import By

    assert health_jobs(http) == 0
    lance = http.get("/v1/models").json()["data"][0]["lance"]
    steps, side = lance["limits"]["max_inference_steps"], lance["max_image_side"]   # the longest run
    panel(page, "t2i")
    set_value(page, "t2i", "size-width", side)
    set_value(page, "t2i", "size-height", side)
    set_value(page, "t2i", "num_inference_steps", steps)
    page.execute_script(OBSERVE, "panel-t2i")
    p = page.find_element(By.ID, "panel-t2i")
    p.find_element(By.CSS_SELECTOR, "button.run").click()
    wait_js(page, "return window.__seen.progress.length >= 3", "three denoising steps")
    started = time.monotonic()
    wait_js(page, "return window.__seen.progress.length >= 5", "five denoising steps")
    per_step = (time.monotonic() - started) / 2
    assert health_jobs(http) == 1        # the job is in the DiT's table while it runs
    p.find_element(By.CSS_SELECTOR, "button.stop").click()
    stopped_at = time.monotonic()
    wait_js(page, "return document.getElementById('panel-t2i').getAttribute('aria-busy') === 'false'", "the stop")
    assert p.find_element(By.CSS_SELECTOR, ".status").text.startswith("Stopped after")
    step_at_stop = page.execute_script("return window.__seen.progress.at(-1)[0]")
    while health_jobs(http) != 0:
        assert time.monotonic() - stopped_at < 30, "the DiT job was not dropped after Stop"
        time.sleep(0.2)
    dropped_after = time.monotonic() - stopped_at
    remaining = (steps - step_at_stop) * per_step
    assert dropped_after < remaining / 2, (dropped_after, remaining)   # dropped, not run to the end
    assert not p.find_elements(By.CSS_SELECTOR, ".result img")
    screenshot(page, shots, "stopped_t2i")
    # and the server goes on serving
    assert run_and_wait_small(page).startswith("Done in")
    assert health_jobs(http) == 0


def run_and_wait_small(page) -> str:
    set_value(page, "t2i", "size-width", 64)
    set_value(page, "t2i", "size-height", 64)
    set_value(page, "t2i", "num_inference_steps", 2)
    return run_and_wait(page, "t2i")


def test_several_images_come_from_the_images_api(http, page, shots):
    from selenium.webdriver.common.by import By

    panel(page, "t2i")
    set_value(page, "t2i", "prompt", "a red fox in fresh snow")
    set_value(page, "t2i", "size-width", 64)
    set_value(page, "t2i", "size-height", 80)
    set_value(page, "t2i", "num_inference_steps", 2)
    set_value(page, "t2i", "seed", 7)
    set_value(page, "t2i", "n", 2)
    assert run_and_wait(page, "t2i").startswith("Done in")
    srcs = [img.get_attribute("src") for img in page.find_elements(By.CSS_SELECTOR, "#panel-t2i .result img")]
    resp = http.post("/v1/images/generations", json={
        "prompt": "a red fox in fresh snow", "size": "64x80", "n": 2, "num_inference_steps": 2, "seed": 7})
    assert resp.status_code == 200, resp.text[:300]
    assert srcs == [f"data:image/png;base64,{d['b64_json']}" for d in resp.json()["data"]]
    screenshot(page, shots, "result_t2i_two_images")


def test_an_image_dropped_on_the_drop_zone_is_taken(page, tmp_path):
    """Drag and drop: a file dropped anywhere on the box becomes the field's file (with a preview)."""
    raw = input_png(tmp_path / "dropped.png", 64, 48)
    panel(page, "image_edit")
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        const drop = document.querySelector('#panel-image_edit .drop');
        drop.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        drop.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, base64.b64encode(raw).decode())
    assert page.execute_script("return document.getElementById('image_edit-image').files[0].name") == "dropped.png"
    caption = wait_js(page, """const p = document.querySelector('#panel-image_edit .preview .hint');
                               return p && p.textContent.includes('×') && p.textContent""", "the preview")
    assert "64×48" in caption


# -- what the page offers follows /v1/models ---------------------------------------------------------------

VIDEO_TASKS = ["t2v", "i2v", "video_edit", "x2t_video"]


@contextlib.contextmanager
def ingress_app(app):
    """Serve an ingress FastAPI app (no stages behind it: only /v1/models and the page answer) on
    a free local port, in a thread."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the ingress app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def settings(**kw):
    from serve_app.ingress import IngressSettings

    return IngressSettings(served_model_name="lance", model_path="/models/Lance", **kw)


@pytest.fixture(scope="module")
def video_ingress():
    """A server that lists the video tasks."""
    from serve_app.ingress import ROUTED_TASKS, LanceService, build_fastapi_app

    with ingress_app(build_fastapi_app(LanceService(settings(tasks=(*ROUTED_TASKS, *VIDEO_TASKS))))) as url:
        yield url


def test_video_tabs_appear_when_the_server_lists_video_tasks(video_ingress, driver, shots):
    from selenium.webdriver.common.by import By

    driver.get(f"{video_ingress}/playground")
    wait_js(driver, "return document.querySelectorAll('[role=tab]').length > 0", "the tabs")
    tabs = driver.execute_script("return [...document.querySelectorAll('[role=tab]')].map(t => t.dataset.task)")
    assert tabs == IMAGE_TASKS + VIDEO_TASKS
    assert driver.find_element(By.ID, "model-line").text.startswith("Model lance")
    assert not driver.find_element(By.ID, "tiny-banner").is_displayed()   # real weights: no warning
    expected = {"t2v": ["prompt", "size", "num_frames", "num_inference_steps", "seed"],
                "i2v": ["image", "prompt", "num_frames"], "video_edit": ["video", "prompt"],
                "x2t_video": ["video", "prompt", "max_tokens", "temperature"]}
    for task, fields in expected.items():
        p = panel(driver, task)
        shown = [box.get_attribute("data-field") for box in p.find_elements(By.CSS_SELECTOR, "[data-field]")]
        assert all(f in shown for f in fields), (task, shown)
        if "video" in fields:
            assert driver.find_element(By.ID, f"{task}-video").get_attribute("accept") == "video/*"
        screenshot(driver, shots, f"tab_{task}")


def test_a_401_asks_for_the_api_key_and_sends_it_as_a_bearer_token(driver, shots):
    """The key flow against the ingress app behind a bearer check with the contract of issue 13
    (401, an OpenAI error body, `WWW-Authenticate: Bearer`): the page asks for the key, keeps it in
    sessionStorage only, and sends it on every API call."""
    from selenium.webdriver.common.by import By
    from starlette.responses import JSONResponse

    from serve_app.ingress import LanceService, build_fastapi_app

    app = build_fastapi_app(LanceService(settings()))
    seen = []

    @app.middleware("http")
    async def require_key(request, call_next):
        if request.url.path.startswith("/v1/"):
            seen.append((request.url.path, request.headers.get("authorization")))
            if request.headers.get("authorization") != "Bearer sk-test-123":
                return JSONResponse({"error": {"message": "a valid API key is required", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    with ingress_app(app) as url:
        driver.get(f"{url}/")
        driver.execute_script("sessionStorage.clear(); localStorage.clear();")
        driver.get(f"{url}/")
        wait_js(driver, "return !document.getElementById('api-key-panel').hidden", "the API key question")
        reason = driver.find_element(By.ID, "api-key-reason").text
        assert "a valid API key is required" in reason
        assert driver.switch_to.active_element.get_attribute("id") == "api-key-input"   # focus is there
        screenshot(driver, shots, "api_key_asked")
        assert not driver.find_elements(By.CSS_SELECTOR, "[role=tab]")
        driver.switch_to.active_element.send_keys("sk-test-123\n")                    # Enter saves
        wait_js(driver, "return document.querySelectorAll('[role=tab]').length > 0", "the tabs after the key")
        assert driver.find_element(By.ID, "api-key-panel").get_attribute("hidden") is not None
        assert driver.execute_script("return sessionStorage.getItem('lance-playground.api-key')") == "sk-test-123"
        assert driver.execute_script("return localStorage.length") == 0
    assert seen[0] == ("/v1/models", None) and seen[-1] == ("/v1/models", "Bearer sk-test-123")
