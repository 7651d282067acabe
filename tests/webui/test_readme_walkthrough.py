"""The README followed as a newcomer, in a real browser, in a webui without sdtrain: Extensions → Install
from URL (this repository's committed HEAD, by its path) → Install → Installed → Apply (A1111 started
without webui.sh says "Apply and quit": the test starts it again, as a user would), then "Your first
embedding": preprocess the pictures, create an embedding, train it with the README's fields (at the tiny
model's size), and use it in a txt2img prompt, whose infotext names it.

Opt-in (SDTRAIN_README_WALKTHROUGH=1; a server start and a restart, minutes on a small machine), A1111 only;
with SDTRAIN_SCREENSHOTS set, a screenshot of each step goes there."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, WebUI
from webui_hosts import selected

HOST = selected()
CHROMIUM = os.environ.get("SDTRAIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(os.environ.get("SDTRAIN_README_WALKTHROUGH") != "1",
                       reason="opt-in: SDTRAIN_README_WALKTHROUGH=1 (installs from the Extensions tab, restarts)"),
    pytest.mark.skipif(HOST.name != "a1111", reason="the walkthrough is A1111's"),
    pytest.mark.skipif(not CHROMIUM, reason="no chromium here (tools/browser.sh installs Debian's)"),
]


def shot(pg, name: str) -> None:
    folder = os.environ.get("SDTRAIN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(folder) / f"walkthrough-{name}.png"))


def tab(pg, container: str, label: str):
    return pg.locator(f"{container} .tab-nav button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first


def fill(pg, elem_id: str, value) -> None:
    field = pg.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input[type=text]").first
    field.fill(str(value))
    field.press("Tab")


def text(pg, selector: str) -> str:
    return pg.locator(selector).first.inner_text()


@pytest.mark.timeout(1500)
def test_the_readme_from_install_to_a_prompt(webui_assets):
    playwright = pytest.importorskip("playwright.sync_api")
    server = WebUI(webui_assets, "walkthrough", install=False)
    size = 64  # the tiny model's (the README: 512 for SD1)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            pg = browser.new_page(viewport={"width": 1366, "height": 768})
            pg.set_default_timeout(120_000)
            pg.on("dialog", lambda d: d.accept())
            pg.goto(server.url, wait_until="domcontentloaded")
            pg.wait_for_selector("#tabs", timeout=180_000)
            assert pg.locator("#sdtrain_embedding").count() == 0

            # Install: Extensions → Install from URL → paste → Install; Installed → Apply
            tab(pg, "#tabs", "Extensions").click()
            tab(pg, "#tabs_extensions", "Install from URL").click()
            pg.get_by_label("URL for extension's git repository").fill(REPO.as_uri())
            pg.locator("#tabs_extensions button", has_text=re.compile(r"^\s*Install\s*$")).last.click()
            pg.wait_for_function("() => /Installed into/.test(document.querySelector('#extension_install_result')"
                                 "?.innerText || '')", timeout=180_000)
            shot(pg, "1-installed")
            tab(pg, "#tabs_extensions", "Installed").click()
            pg.wait_for_selector("#extensions input[type=checkbox]", state="attached")
            apply = pg.locator("#extensions_installed_top button").first
            assert apply.inner_text().strip() in ("Apply and restart UI", "Apply and quit")  # the README names both
            apply.click()
            server.proc.wait(120)  # "Apply and quit" (no webui.sh here to restart it): start it again
            server._out.close()
            server.start()
            pg.goto(server.url, wait_until="domcontentloaded")
            pg.wait_for_selector("#sdtrain_embedding", state="attached", timeout=180_000)

            # 1. Pictures: Train → Preprocess images (sdtrain)
            tab(pg, "#tabs", "Train").click()
            tab(pg, "body", "Preprocess images (sdtrain)").click()
            pictures = server.dir / f"myconcept-{size}"
            fill(pg, "sdtrain_preprocess_process_src", webui_assets["data"])
            fill(pg, "sdtrain_preprocess_process_dst", pictures)
            fill(pg, "sdtrain_preprocess_process_width", size)
            fill(pg, "sdtrain_preprocess_process_height", size)
            pg.locator("#sdtrain_preprocess_process_flip input").first.check()
            pg.locator("#sdtrain_preprocess_button").first.click()
            pg.wait_for_function("() => /preprocess (done|failed)/.test(document.querySelector("
                                 "'#sdtrain_preprocess_status')?.innerText || '')")
            assert "preprocess done" in text(pg, "#sdtrain_preprocess_status"), text(pg, "#sdtrain_preprocess_error")
            sources = [f for f in Path(webui_assets["data"]).iterdir() if f.suffix.lower() in (".png", ".jpg", ".webp")]
            assert len(list(pictures.glob("*.png"))) == 2 * len(sources) > 0  # each picture and its mirror
            shot(pg, "2-preprocessed")

            # 2. Create: Textual inversion (sdtrain) → Create embedding
            tab(pg, "body", "Textual inversion (sdtrain)").click()
            assert "SD1" in text(pg, "#sdtrain_train_embedding_model_note")  # the line naming the family
            if not pg.locator("#sdtrain_create_embedding_name").first.is_visible():
                pg.locator("#sdtrain_create_embedding_section").first.locator("button, .label-wrap").first.click()
            fill(pg, "sdtrain_create_embedding_name", "myconcept")
            fill(pg, "sdtrain_create_embedding_init_text", "cat")
            fill(pg, "sdtrain_create_embedding_num_vectors_per_token", 4)
            pg.locator("#sdtrain_create_embedding_button").first.click()
            pg.wait_for_function("() => (document.querySelector('#sdtrain_create_embedding_output textarea')||{})"
                                 ".value?.startsWith('Created')")
            name_box = pg.locator("#sdtrain_train_embedding_embedding_name input").first
            pg.wait_for_function("el => el.value === 'myconcept'", arg=name_box.element_handle())  # selected

            # 3. Train: the README's fields (size: the tiny model's; a short run)
            fill(pg, "sdtrain_train_embedding_data_root", pictures)
            fill(pg, "sdtrain_train_embedding_log_directory", server.dir / "textual_inversion")
            pg.locator("#sdtrain_train_embedding_template_filename input").first.click()
            pg.locator("ul.options li", has_text="subject_filewords.txt").first.click()
            fill(pg, "sdtrain_train_embedding_training_width", size)
            fill(pg, "sdtrain_train_embedding_training_height", size)
            fill(pg, "sdtrain_train_embedding_learn_rate", "0.005")
            fill(pg, "sdtrain_train_embedding_steps", 40)
            fill(pg, "sdtrain_train_embedding_create_image_every", 20)
            fill(pg, "sdtrain_train_embedding_save_embedding_every", 20)
            pg.locator("#sdtrain_train_embedding_button").first.click()

            # 4. Watch: the status line, then done
            pg.wait_for_function("() => /step \\d+\\/40/.test(document.querySelector('#sdtrain_train_embedding_status')"
                                 "?.innerText || '')")
            shot(pg, "3-training")
            pg.wait_for_function("() => /train embedding (done|failed|stopped)/.test(document.querySelector("
                                 "'#sdtrain_train_embedding_status')?.innerText || '')", timeout=600_000)
            status = text(pg, "#sdtrain_train_embedding_status")
            assert "train embedding done" in status and "step 40/40" in status, (status, text(
                pg, "#sdtrain_train_embedding_error"))
            files = pg.locator("#sdtrain_train_embedding_files textarea").first.input_value()
            assert "myconcept-20.pt" in files and "myconcept.pt" in files, files  # the copies the README names
            assert re.search(r"sdtrain \d+\.\d+\.\d+ · AGPL-3\.0", text(pg, "#sdtrain_train_embedding_footer"))

            # 5. Use it: txt2img with the name in the prompt; the infotext lists it
            tab(pg, "#tabs", "txt2img").click()
            pg.locator("#txt2img_prompt textarea").first.fill("a photo of myconcept on a beach")
            fill(pg, "txt2img_width", size)
            fill(pg, "txt2img_height", size)
            fill(pg, "txt2img_steps", 4)
            pg.locator("#txt2img_generate").first.click()
            pg.wait_for_function("() => /TI hashes|Error/.test(document.querySelector('#html_info_txt2img')"
                                 "?.innerText || '')", timeout=180_000)
            info = text(pg, "#html_info_txt2img")
            assert HOST.names_embedding(info, "myconcept"), info
            shot(pg, "4-prompt")
            browser.close()
    finally:
        server.stop()
