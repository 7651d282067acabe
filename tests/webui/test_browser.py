"""sdtrain's tabs in a real browser, in a real webui: Debian's chromium driven by Playwright (pointed at
the system browser; nothing downloads one). At 1366x768, as a user: open the Train tab (Forge: sdtrain's
own tab), create an embedding (it is selected for training at once), fill the form, Train, watch the
status and the charts update beside the form (hover shows values), Interrupt, see the file listed, find
the job in Jobs. No console error from sdtrain's page code. With SDTRAIN_SCREENSHOTS set, the
screenshots go there (tools/screenshots.sh copies them into docs/)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import WebUI
from webui_hosts import selected

HOST = selected()
CHROMIUM = os.environ.get("SDTRAIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.webui,
              pytest.mark.skipif(not CHROMIUM, reason="no chromium here (tools/browser.sh installs Debian's)")]
VIEWPORT = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def webui(webui_assets):
    """A server of this module's own (each module's servers need folders of their own: another module may
    have run in this worker before, with the shared `webui` server's)."""
    server = WebUI(webui_assets, "browser")
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


def test_train_from_the_tab_in_a_browser(page, webui, webui_assets):
    pg = page
    top = "Train" if HOST.verdict("train_tab") is None else "Train (sdtrain)"
    tab_button(pg, "#tabs", top).click()
    if HOST.verdict("train_tab") is None:
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
    pg.wait_for_function("() => /browserti/.test(document.querySelector('#sdtrain_jobs_table').innerText)")
    assert "stopped" in table.inner_text()
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
