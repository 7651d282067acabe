"""A user's session with a real webui, on one server: sdtrain's tabs in a real browser, then the webui's
end and restart with a run going.

The browser: Debian's chromium driven by Playwright (pointed at the system browser; nothing downloads one).
At 1366x768, as a user: open the Train tab (Forge: sdtrain's own tab), create an embedding (it is
selected for training at once), fill the form, Train, watch the status and the charts update beside the
form (hover shows values), Interrupt, see the file listed, find the job in Jobs, open it, reload the page.
No console error from sdtrain's page code. With SDTRAIN_SCREENSHOTS set, the screenshots go there.

The restart: a training run outlives the webui's end, killed (SIGKILL: a power cut, the OOM killer) or
shut down (SIGINT from Ctrl-C, SIGTERM from a service manager): started again on the same folders, the
webui lists the jobs it had, shows the cut one as interrupted (or stopped, when the signal let it save
first), and one request resumes it from its resume point; the run ends bit-identical to one never
interrupted. Ctrl-C is checked where the webui runs in the main thread (A1111) and in Forge's worker
thread; SIGTERM in reForge's (the same worker-thread path as Forge's); the unit tests take both signals
through the handler itself (tests/test_signal_stop.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import WebUI
from webui_hosts import offers, selected

from lib_sdtrain.core.formats.embedding_io import load_embedding

HOST = selected()
CHROMIUM = os.environ.get("SDTRAIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.webui
needs_browser = pytest.mark.skipif(not CHROMIUM, reason="no chromium here (tools/browser.sh installs Debian's)")
#: the shutdown signal sent mid-run in each host
SHUTDOWN = signal.Signals[HOST.shutdown_signal]
STEPS = 40
VIEWPORT = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def webui(webui_assets):
    """A server of this module's own (each module's servers need folders of their own: another module may
    have run in this worker before, with the shared `webui` server's)."""
    server = WebUI(webui_assets, "session")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(webui):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport=VIEWPORT)
        pg.console_errors = []  # type: ignore[attr-defined]
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        pg.set_default_timeout(60_000)
        pg.goto(webui.url, wait_until="domcontentloaded")
        pg.wait_for_selector("#sdtrain_embedding", state="attached", timeout=180_000)
        yield pg
        browser.close()


def shot(pg, name: str) -> None:
    folder = os.environ.get("SDTRAIN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(folder) / f"{HOST.name}-{name}.png"))


def tab_button(pg, container: str, label: str):
    return pg.locator(f"{container} .tab-nav button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first


def fill(pg, elem_id: str, value) -> None:
    """Type into a textbox, number or slider's number field, as a user does (then leave the field)."""
    field = pg.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input[type=text]").first
    field.fill(str(value))
    field.press("Tab")


@needs_browser
def test_train_from_the_tab_in_a_browser(page, webui, webui_assets):
    pg = page
    in_train_tab = offers(webui, "train_tab") is None
    top = "Train" if in_train_tab else "Train (sdtrain)"
    tab_button(pg, "#tabs", top).click()
    if in_train_tab:
        # the host's own training sub-tabs are hidden (sdtrain serves their routes), its output column too
        pg.wait_for_function("() => [...document.querySelectorAll('#train_tabs .tab-nav button')].filter("
                             "b => ['Create embedding', 'Create hypernetwork', 'Train'].includes(b.textContent.trim()))"
                             ".every(b => b.style.display === 'none')")
        for label in ("Create embedding", "Create hypernetwork", "Train"):
            assert not tab_button(pg, "#train_tabs", label).is_visible()
        pg.locator("#ti_gallery_container").first.wait_for(state="hidden")
    for label in ("Textual inversion (sdtrain)", "Hypernetwork (sdtrain)", "Preprocess images (sdtrain)",
                  "Jobs (sdtrain)"):
        assert tab_button(pg, "body", label).is_visible(), label
    tab_button(pg, "body", "Textual inversion (sdtrain)").click()
    form, output = pg.locator("#sdtrain_embedding_form").first, pg.locator("#sdtrain_embedding_output").first
    output.wait_for()
    a, b = form.bounding_box(), output.bounding_box()
    assert b["x"] >= a["x"] + a["width"] - 5 and b["y"] < VIEWPORT["height"] / 2, (a, b)  # beside the form
    shot(pg, "tab")

    # create: the new embedding is selected for training at once
    section = pg.locator("#sdtrain_create_embedding_section").first
    if not pg.locator("#sdtrain_create_embedding_name").first.is_visible():
        section.locator("button, .label-wrap").first.click()
    fill(pg, "sdtrain_create_embedding_name", "browserti")
    fill(pg, "sdtrain_create_embedding_init_text", "shape")
    pg.locator("#sdtrain_create_embedding_button").first.click()
    pg.wait_for_function("() => (document.querySelector('#sdtrain_create_embedding_output textarea')||{}).value"
                         "?.startsWith('Created')")
    name_box = pg.locator("#sdtrain_train_embedding_embedding_name input").first
    pg.wait_for_function("el => el.value === 'browserti'", arg=name_box.element_handle())

    fill(pg, "sdtrain_train_embedding_data_root", webui_assets["data"])
    fill(pg, "sdtrain_train_embedding_log_directory", "browser_log")
    fill(pg, "sdtrain_train_embedding_training_width", 64)
    fill(pg, "sdtrain_train_embedding_training_height", 64)
    fill(pg, "sdtrain_train_embedding_steps", 100000)
    fill(pg, "sdtrain_train_embedding_create_image_every", 4)
    fill(pg, "sdtrain_train_embedding_save_embedding_every", 0)
    pg.locator("#sdtrain_train_embedding_latent_sampling_method").first.scroll_into_view_if_needed()  # the form's end
    pg.locator("#sdtrain_train_embedding_button").first.click()

    status = pg.locator("#sdtrain_train_embedding_status").first
    steps = []
    deadline = time.time() + 180
    while len(set(steps)) < 3 and time.time() < deadline:  # the status updates while it trains
        m = re.search(r"step (\d+)/100000", status.inner_text())
        if m:
            steps.append(int(m.group(1)))
        time.sleep(0.5)
    assert len(set(steps)) >= 3 and steps == sorted(steps), steps
    box = status.bounding_box()  # in view beside the form's end, no scrolling back up
    assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], box
    chart = pg.locator("#sdtrain_train_embedding_loss_chart").first
    chart.locator(".vega-embed canvas, .vega-embed svg, canvas").first.wait_for()
    pg.wait_for_function("() => document.querySelectorAll('#sdtrain_train_embedding_previews img').length > 0",
                         timeout=180_000)
    shot(pg, "training")

    pg.locator("#sdtrain_train_embedding_stop").first.click()
    pg.wait_for_function("() => /stopped/.test(document.querySelector('#sdtrain_train_embedding_status').innerText)",
                         timeout=120_000)
    time.sleep(1.5)  # the chart's last redraw (it redraws at every update while the job runs)
    cb = chart.locator(".vega-embed canvas, .vega-embed svg, canvas").first.bounding_box()
    tip = pg.locator("#vg-tooltip-element, .vg-tooltip, [role=tooltip]")
    hovered = ""
    for fx in (0.4, 0.55, 0.3):  # down a vertical line through the plot, it crosses the curves
        y = cb["y"] + 0.05 * cb["height"]
        while not hovered and y < cb["y"] + 0.95 * cb["height"]:
            pg.mouse.move(cb["x"] + cb["width"] * fx, y)
            y += 2
            if tip.count() and tip.first.is_visible():
                hovered = tip.first.inner_text()
        if hovered:
            break
    assert "step" in hovered.lower(), "no values on hover over the loss chart"
    files = pg.locator("#sdtrain_train_embedding_files textarea").first.input_value()
    assert "browserti.pt" in files
    _, listed = webui.get("/sdapi/v1/embeddings")
    assert "browserti" in listed["loaded"]

    tab_button(pg, "body", "Jobs (sdtrain)").click()
    pg.locator("#sdtrain_jobs_refresh").first.click()
    table = pg.locator("#sdtrain_jobs_table").first
    # the training's row, stopped (wait for it: the table may still show its last refresh, from before the stop)
    pg.wait_for_function("() => /train embedding\\s+browserti\\s+stopped/.test("
                         "document.querySelector('#sdtrain_jobs_table').innerText)")
    # a click on its row picks it; Open shows its chart and files
    table.get_by_text("stopped", exact=True).last.click()  # the training's row (gradio 4 keeps a hidden copy first)
    pick = pg.locator("#sdtrain_jobs_pick input").first
    pg.wait_for_function("el => /^[0-9a-f]{12}$/.test(el.value)", arg=pick.element_handle())
    pg.locator("#sdtrain_jobs_open").first.click()
    pg.wait_for_function("() => /stopped/.test(document.querySelector('#sdtrain_jobs_status').innerText)")
    pg.locator("#sdtrain_jobs_loss_chart").first.locator(".vega-embed canvas, .vega-embed svg, canvas").first.wait_for()
    assert "browserti.pt" in pg.locator("#sdtrain_jobs_files textarea").first.input_value()
    shot(pg, "jobs")
    # the list survives a page reload (the service holds it; Reload UI: test_contract.py)
    pg.reload(wait_until="domcontentloaded")
    pg.wait_for_selector("#sdtrain_jobs", state="attached", timeout=180_000)
    tab_button(pg, "#tabs", top).click()
    tab_button(pg, "body", "Jobs (sdtrain)").click()
    pg.wait_for_function("() => /browserti/.test(document.querySelector('#sdtrain_jobs_table').innerText)")
    ours = [e for e in pg.console_errors if "sdtrain" in e.lower()]
    assert ours == [], ours


def body(name: str, data) -> dict:
    """A run with a resume point after every step (resume_point_minutes), so a kill can land anywhere."""
    return {"embedding_name": name, "data_root": str(data), "steps": STEPS, "training_width": 64,
            "training_height": 64, "learn_rate": "0.02", "batch_size": 2, "seed": 7, "flip_p": 0.5,
            "shuffle_tags": True, "template_filename": "subject_filewords.txt", "create_image_every": 0,
            "save_embedding_every": 0, "log_directory": "ti_log", "resume_point_minutes": 0.0001}


def run_until(server: WebUI, job_id: str, step: int) -> int:
    deadline = time.time() + 180
    while time.time() < deadline:
        job = server.get(f"/sdtrain/v1/jobs/{job_id}")[1]
        assert job["state"] in ("queued", "running"), job
        if job["step"] >= step:
            return job["step"]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {step}")


def create(server: WebUI, name: str) -> None:
    _, out = server.post("/sdtrain/v1/jobs", {"kind": "create_embedding",
                                              "config": {"name": name, "init_text": "shape", "num_vectors_per_token": 2}})
    job = server.wait_job(out["id"])
    assert job["state"] == "done", (job, server.log_text()[-3000:])


def test_a_run_cut_by_kill_then_by_shutdown_resumes_after_restarts_and_ends_bit_identical(webui, webui_assets):
    """After the browser test, on the same server (a start less per host): SIGKILL mid-run, restart, the
    job is interrupted and resumes; then the webui's shutdown signal mid-run (SHUTDOWN: Ctrl-C or
    SIGTERM, by host), restart, the job is stopped with its file saved, and resumes to the end,
    bit-identical to a run never interrupted."""
    server, data = webui, webui_assets["data"]
    create(server, "whole")
    create(server, "cut")
    _, ref = server.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": body("whole", data)})
    ref = server.wait_job(ref["id"])
    assert ref["state"] == "done" and ref["step"] == STEPS, ref

    # 1. SIGKILL mid-run: nothing runs at the end, the resume point on disk is all there is
    _, cut = server.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": body("cut", data)})
    at = run_until(server, cut["id"], 5)
    assert server.end(signal.SIGKILL) == -signal.SIGKILL
    point = server.embeddings / "cut.pt.resume"
    assert point.exists()
    server.start()
    jobs = {j["id"]: j for j in server.get("/sdtrain/v1/jobs")[1]}
    assert jobs[ref["id"]]["state"] == "done" and jobs[ref["id"]]["step"] == STEPS  # finished jobs stay listed
    assert jobs[cut["id"]]["state"] == "interrupted", jobs[cut["id"]]
    assert "resume it" in jobs[cut["id"]]["error"]
    status, again = server.post(f"/sdtrain/v1/jobs/{cut['id']}/resume")
    assert status == 202, again

    # 2. the webui's shutdown signal mid-run (Ctrl-C or a service manager's SIGTERM): the job stops as Stop
    # does (file saved, resume point kept), then the webui's own handling of the signal ends the process
    at = run_until(server, again["id"], at + 4)
    code = server.end(SHUTDOWN)
    log = server.log_text()
    assert f"{SHUTDOWN.name}: stopping running jobs" in log, log[-3000:]
    assert point.exists()
    server.start()
    stopped = {j["id"]: j for j in server.get("/sdtrain/v1/jobs")[1]}[again["id"]]
    assert stopped["state"] == "stopped" and at <= stopped["step"] < STEPS, stopped
    assert load_embedding(server.embeddings / "cut.pt").step == stopped["step"]  # saved before the exit
    status, again = server.post(f"/sdtrain/v1/jobs/{again['id']}/resume")
    assert status == 202, again
    at = stopped["step"]
    last = server.wait_job(again["id"])
    assert last["state"] == "done" and last["step"] == STEPS, last
    assert f"resumed from step {at}" in last["message"], last

    whole, cut_file = load_embedding(server.embeddings / "whole.pt"), load_embedding(server.embeddings / "cut.pt")
    assert cut_file.step == STEPS and torch.equal(cut_file.vectors["*"], whole.vectors["*"])  # bit-identical
    assert not point.exists()
    print(f"\nrestart ({HOST.name}): SIGKILL, then {SHUTDOWN.name} (exit {code}), ended at {STEPS}, bit-identical")
