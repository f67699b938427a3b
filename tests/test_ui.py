"""The web app in a real browser: Playwright drives Debian's chromium against `backprop ui` (the production build).

One server for the module, in its own Backprop home and sandbox; screenshots of every page land in tests/output/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import DEMO_DATA, ROOT, backprop, wait_for

pytestmark = pytest.mark.e2e
SHOTS = ROOT / "tests" / "output"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    base = tmp_path_factory.mktemp("ui")
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    port = free_port()
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "BACKPROPAGATE_UI__OUTPUT_DIR": str(base / "sandbox"),
           "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25", "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}  # fmt: skip
    log = (base / "ui.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "training.cli", "ui", "--no-browser", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"backprop ui exited {process.returncode}:\n{(base / 'ui.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(url + "ping", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 600, "the web app to build and start")
        yield {"url": url, "env": env, "home": home, "sandbox": base / "sandbox"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def steps_shown(page) -> int:
    text = page.inner_text("#step-count") if page.query_selector("#step-count") else "0"
    return int(re.match(r"\s*(\d+)", text).group(1))


def points_drawn(page, selector: str) -> int:
    """Points of the first SVG polyline matching selector (the charts are polylines computed by the server)."""
    line = page.locator(selector).first
    return len((line.get_attribute("points") or "").split()) if line.count() else 0


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_a_new_user_trains_the_demo_model_and_watches_it_live(server, page):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    assert page.input_value("#field-model") == "demo" and page.input_value("#field-dataset").endswith("capitals.jsonl")
    wait_for(lambda: page.inner_text("#dataset-format") == "openai", 30, "the detected format")
    page.fill("#field-steps", "60")
    page.click("#start")
    wait_for(lambda: steps_shown(page) >= 5, 180, "loss points to arrive")
    wait_for(lambda: points_drawn(page, "#loss-chart polyline") >= 5, 60, "the loss curve")  # one point per step
    first_cpu = page.inner_text("#telemetry-rail")
    assert "CPU" in first_cpu and "%" in first_cpu and "No NVIDIA GPU found" in first_cpu
    wait_for(lambda: page.inner_text("#status-pill") == "completed", 300, "the run to complete")
    assert steps_shown(page) == 60
    assert "completed" in page.inner_text("#event-log") and "Adapter saved" in page.inner_text("body")
    shot(page, "train")
    # The run is real: in the registry, with its folder inside the sandbox.
    runs = json.loads(backprop("list", "--json", env=server["env"], check=True).stdout)
    assert runs[0]["status"] == "completed" and runs[0]["step"] == 60
    assert Path(runs[0]["run_dir"]).is_relative_to(server["sandbox"])


def test_a_reload_re_attaches_to_the_running_job_and_stop_stops_it(server, page):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-steps", "3000")
    page.click("#start")
    wait_for(lambda: steps_shown(page) >= 3, 180, "training to start")
    page.reload()
    wait_for(lambda: page.query_selector("#step-count") is not None, 60, "the run to show again after the reload")
    before = steps_shown(page)
    wait_for(lambda: steps_shown(page) > before, 60, "new steps after the reload")
    page.click("#stop")
    wait_for(lambda: page.inner_text("#status-pill") == "stopped", 120, "the stop")


def test_the_runs_page_lists_a_run_started_from_the_command_line(server, page):
    out = backprop(
        "train", "--model", "demo", "--steps", "3", "--name", "from-the-shell", "--json", env=server["env"], check=True
    )
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    page.goto(server["url"] + "runs")
    page.wait_for_selector("#runs-table")
    assert run_id in page.inner_text("#runs-table") and "from-the-shell" in page.inner_text("#runs-table")
    shot(page, "runs")
    page.click(f"text={run_id}")
    page.wait_for_url(f"**/runs/{run_id}")
    # The run page's layout comes first, its data right after (on_load): wait for the data, not just the page.
    wait_for(lambda: "Parameters" in (body := page.inner_text("body")) and "from-the-shell" in body, 30, "the run page")
    wait_for(lambda: page.locator("#run-telemetry").count() == 1, 30, "the telemetry recorded while it trained")
    assert "completed" in page.inner_text("body")
    shot(page, "run-detail")
    run_dir = Path(json.loads(backprop("show-run", run_id, "--json", env=server["env"], check=True).stdout)["run_dir"])
    page.click("#delete-run")
    page.click("#confirm-delete")
    page.wait_for_url("**/runs")
    wait_for(lambda: run_id not in page.inner_text("body"), 30, "the run to leave the list")
    assert not run_dir.exists()


def test_without_a_gpu_the_rail_still_moves(server, page):
    page.goto(server["url"] + "runs")
    page.wait_for_selector("#telemetry-rail")
    # A tab opened now shows the recent past at once (one sampler per server), then keeps moving.
    wait_for(lambda: points_drawn(page, "#telemetry-rail .sparkline polyline") >= 5, 30, "several points of history")
    first = page.locator("#telemetry-rail .sparkline polyline").first.get_attribute("points")
    wait_for(lambda: page.locator("#telemetry-rail .sparkline polyline").first.get_attribute("points") != first, 30,
             "a new telemetry point")  # fmt: skip


def upload(page, server, path: Path) -> None:
    page.goto(server["url"] + "dataset")
    page.wait_for_selector("#upload-button")
    page.set_input_files("#dataset-upload input[type=file]", str(path))
    page.click("#upload-button")


def test_an_uploaded_dataset_is_previewed_with_statistics_and_goes_to_training(server, page, tmp_path):
    data = tmp_path / "my chats (1).jsonl"
    data.write_text(DEMO_DATA.read_text())
    upload(page, server, data)
    wait_for(lambda: page.query_selector("#dataset-stats") is not None, 120, "the dataset statistics")
    stats = page.inner_text("#dataset-stats")
    assert "openai" in stats and "40" in stats
    assert "What is the capital of France?" in page.inner_text("#dataset-preview")
    stored = server["sandbox"] / "datasets" / "my_chats_1.jsonl"  # a safe name, inside the sandbox
    assert stored.read_text() == data.read_text()
    shot(page, "dataset")
    page.click("#use-for-training")
    page.wait_for_url(server["url"])
    wait_for(lambda: page.input_value("#field-dataset") == str(stored), 30, "the Train page to take the dataset")


def test_a_bad_upload_shows_every_bad_line(server, page, tmp_path):
    good = DEMO_DATA.read_text().splitlines()[0]
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join([good, "{not json", good, '{"messages": [{"role": "user", "content": "no answer"}]}']) + "\n")
    upload(page, server, data)
    wait_for(lambda: page.query_selector("#dataset-bad-lines") is not None, 120, "the bad lines")
    bad = page.inner_text("#dataset-bad-lines")
    assert "line 2:" in bad and "invalid JSON" in bad and "line 4:" in bad
    shot(page, "dataset-errors")


def test_a_file_that_is_not_a_dataset_is_refused(server, page, tmp_path):
    script = tmp_path / "evil.sh"
    script.write_text("rm -rf /\n")
    page.goto(server["url"] + "dataset")
    page.wait_for_selector("#upload-button")
    page.set_input_files("#dataset-upload input[type=file]", str(script))  # the browser refuses it before any upload
    wait_for(lambda: page.query_selector("#dataset-error") is not None, 60, "the refusal")
    refusal = page.inner_text("#dataset-error")
    assert "UI_UPLOAD_REJECTED" in refusal and "type" in refusal
    assert not list((server["sandbox"] / "datasets").glob("evil*"))


def test_the_trained_run_exports_to_gguf_verified_by_llama_cpp_and_answers_in_chat(server, page):
    # Continues the new user's path with the run trained from the browser in the first test (60 steps).
    runs = json.loads(backprop("list", "--json", env=server["env"], check=True).stdout)
    run_id = next(r["id"] for r in runs if r["status"] == "completed" and r["step"] == 60)
    page.goto(server["url"] + "export")
    page.wait_for_selector("#export-start")
    page.click("#export-run")
    page.get_by_role("option", name=run_id, exact=True).click()
    page.click("#export-quantization")
    page.get_by_role("option", name="q8_0", exact=True).click()
    page.click("#export-start")
    wait_for(lambda: page.query_selector("#export-result") or page.query_selector("#export-error"), 300, "the export")
    result = page.inner_text("#export-result")
    assert ".q8_0.gguf" in result and "verification: passed" in result and "tokenizer_match True" in result
    shot(page, "export")

    page.goto(server["url"] + "chat")
    page.wait_for_selector("#chat-input")
    page.click("#chat-source")
    page.get_by_role("option", name=run_id, exact=True).click()
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    wait_for(lambda: page.locator(".reply").count() >= 1 and page.locator(".reply").last.inner_text().strip(), 180, "a reply")
    wait_for(lambda: page.is_enabled("#chat-send"), 180, "the reply to finish")
    assert "capital" in page.locator(".reply").last.inner_text()  # 60 steps on the demo data: it answers in kind
    # Side by side: the same prompt to the base model, whose reply shows beside the tuned one.
    page.get_by_text("Side by side with the base model").click()
    page.fill("#chat-input", "What is the capital of Japan?")
    page.click("#chat-send")
    wait_for(lambda: page.locator(".base-reply").count() >= 1, 180, "the base model's reply")
    wait_for(lambda: page.is_enabled("#chat-send"), 180, "both replies to finish")
    assert page.locator(".reply").count() == 2
    shot(page, "chat")


def test_a_multi_run_campaign_shows_its_runs_merges_and_forgetting_heatmap(server, page):
    page.goto(server["url"] + "multi-run")
    page.wait_for_selector("#mr-start")
    page.fill("#mr-steps", "15")
    page.click("#mr-start")
    wait_for(lambda: page.query_selector("#mr-status") is not None, 60, "the campaign to start")
    wait_for(lambda: page.inner_text("#mr-status") == "completed", 400, "the campaign to complete")
    wait_for(lambda: page.query_selector("#mr-bwt") is not None, 30, "the BWT")
    cells = [c.strip() for c in page.locator("#mr-heatmap > div").all_inner_texts()]
    assert len(cells) == 9 and sum(bool(c) for c in cells) == 6  # lower triangle of a 3x3 matrix
    assert page.locator("#mr-merges tbody tr").count() == 3 and "0.707" in page.inner_text("#mr-merges")
    assert "BWT" in page.inner_text("#mr-bwt")
    shot(page, "multi-run")
