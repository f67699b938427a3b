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
from fake_ollama import FakeOllama

pytestmark = pytest.mark.e2e
SHOTS = ROOT / "tests" / "output"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`backprop ui` in a subprocess (its own process group), in its own Backprop home and sandbox."""

    def __init__(self, base: Path, env: dict):
        self.base, self.env, self.port = base, env, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.base / "ui.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "ui", "--no-browser", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.base, start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_for(self.up, 600, "the web app to build and start")

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"backprop ui exited {self.process.returncode}:\n{(self.base / 'ui.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(self.url + "ping", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    base = tmp_path_factory.mktemp("ui")
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    with FakeOllama() as ollama:  # the Export page registers models with this stand-in, on loopback
        env = {
            **os.environ,
            "BACKPROPAGATE_HOME": str(home),
            "BACKPROPAGATE_UI__OUTPUT_DIR": str(base / "sandbox"),
            "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25",
            "BACKPROPAGATE_MAX_CPU_PERCENT": "100",
            "OLLAMA_HOST": ollama.host,
        }
        env.pop("HF_TOKEN", None)  # fmt: skip
        ui = Server(base, env)
        ui.start()
        try:
            yield {"url": ui.url, "env": env, "home": home, "sandbox": base / "sandbox", "ui": ui, "ollama": ollama}
        finally:
            ui.stop()


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
    from training.telemetry import make_gpu_probe

    gpus = make_gpu_probe().read()  # what the app's rail reads on this machine (NVML sees every GPU)
    assert "CPU" in first_cpu and "%" in first_cpu
    assert (f"GPU {gpus[0].index} {gpus[0].name}" if gpus else "No NVIDIA GPU found") in first_cpu
    wait_for(lambda: page.inner_text("#status-pill") == "completed", 300, "the run to complete")
    assert steps_shown(page) == 60
    assert "completed" in page.inner_text("#event-log") and "Adapter saved" in page.inner_text("body")
    shot(page, "train")
    # The run is real: in the registry, with its folder inside the sandbox.
    runs = json.loads(backprop("list", "--json", env=server["env"], check=True).stdout)
    assert runs[0]["status"] == "completed" and runs[0]["step"] == 60
    assert Path(runs[0]["run_dir"]).is_relative_to(server["sandbox"])


def plan_row(page, setting: str) -> str:
    """The Train page's plan row of `setting` as the page shows it: "setting value reason" ("" while not shown)."""
    row = page.locator(f'.plan-row[data-setting="{setting}"]')
    return " ".join(row.first.inner_text().split()) if row.count() else ""


def test_the_train_page_plans_the_run_and_replans_when_the_dataset_or_the_model_changes(server, page, tmp_path):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    wait_for(lambda: "40 examples" in page.inner_text("#plan-panel"), 60, "the plan of the demo model on the demo data")
    assert plan_row(page, "Steps") == "Steps 300 this model's tuned default"
    assert page.get_attribute("#field-steps", "placeholder") == "300"  # the empty field shows what the plan fills in
    panel = page.inner_text("#plan-panel")
    assert "GiB peak of" in panel and "fits" in panel and "tokens/s" in panel and "GFLOP/s a CPU core" in panel

    # Another dataset: the plan reads its token lengths.
    data = tmp_path / "long.jsonl"
    with data.open("w") as f:
        for i in range(240):
            answer = " ".join(f"Fact {j}: city {i} has {j * 7 + i} parks." for j in range(12 + i % 9))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about city {i}."},
                                             {"role": "assistant", "content": answer}]}) + "\n")  # fmt: skip
    page.fill("#field-dataset", str(data))
    wait_for(lambda: "data: 240 examples" in page.inner_text("#plan-panel"), 60, "the plan of the new dataset")
    # Another model (a folder, no tuned defaults): the data's size decides the rank, its lengths the max length.
    page.fill("#field-model", str(server["home"] / "models" / next((server["home"] / "models").iterdir()).name))
    wait_for(lambda: plan_row(page, "LoRA rank") == "LoRA rank 16 the usual rank for 240 examples", 60, "the new model's plan")
    assert "covers" in plan_row(page, "Max length (tokens)")
    # A typed value is the user's: it wins, and the plan says so.
    page.fill("#field-batch_size", "2")
    wait_for(lambda: plan_row(page, "Batch size").startswith("Batch size 2 yours"), 60, "the typed batch size")
    assert plan_row(page, "Batch size").endswith("set by you")
    assert page.query_selector("#plan-error") is None and page.locator(".plan-problem").count() == 0
    # A typed setting that will not work is flagged before the start, with what to change.
    page.get_by_text("Advanced").click()
    page.fill("#field-max_seq_length", "4096")
    wait_for(lambda: page.locator(".plan-problem").count() == 1, 60, "the problem")
    assert "[INPUT_INVALID_ARGUMENT] max_seq_length 4096" in (problem := page.inner_text(".plan-problem"))
    assert "Use Max length 1024 or less." in problem
    shot(page, "train-plan")


def run_page_steps(page) -> int:
    text = page.inner_text("#run-step") if page.query_selector("#run-step") else "0"
    return int(re.match(r"\s*(\d+)", text).group(1))


def test_reloads_restarts_and_other_tabs_all_follow_the_running_job(server, page, browser):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-steps", "3000")
    page.click("#start")
    wait_for(lambda: steps_shown(page) >= 3, 180, "training to start")
    run_id = page.inner_text("#train-run-id")
    page.reload()
    wait_for(lambda: page.query_selector("#step-count") is not None, 60, "the run to show again after the reload")
    before = steps_shown(page)
    wait_for(lambda: steps_shown(page) > before, 60, "new steps after the reload")

    # Another tab (its own session) watches the same job live on the run's page.
    other = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    other.goto(server["url"] + f"runs/{run_id}")
    wait_for(lambda: run_page_steps(other) > 0, 60, "the run page to show the job")
    before = run_page_steps(other)
    wait_for(lambda: run_page_steps(other) > before, 60, "the run page to follow new steps")
    assert points_drawn(other, "#run-loss polyline") > 0

    # Restarting `backprop ui` leaves the job training in its own worker; the page re-attaches to it.
    server["ui"].stop()
    status = json.loads(backprop("status", run_id, "--json", env=server["env"], check=True).stdout)
    assert status["status"] == "running"
    server["ui"].start()
    page.reload()
    wait_for(lambda: page.query_selector("#step-count") is not None, 60, "the run to show after the restart")
    before = steps_shown(page)
    wait_for(lambda: steps_shown(page) > before, 60, "new steps after the restart")

    # Stop from the run page: every tab sees it. Resume continues from the checkpoint the stop saved.
    other.reload()
    other.wait_for_selector("#run-stop:not([disabled])")
    other.click("#run-stop")
    wait_for(lambda: page.inner_text("#status-pill") == "stopped", 120, "the stop, in the Train tab")
    wait_for(lambda: other.inner_text("#run-status") == "stopped", 30, "the stop, in the run tab")
    stopped_at = run_page_steps(other)
    other.click("#run-resume")
    wait_for(lambda: other.inner_text("#run-status") == "running" and run_page_steps(other) > stopped_at, 180,
             "the resumed job to train on")  # fmt: skip
    assert run_page_steps(other) > stopped_at
    shot(other, "run-detail-live")
    other.click("#run-stop")
    wait_for(lambda: other.inner_text("#run-status") == "stopped", 120, "the second stop")
    other.context.close()


def test_the_runs_page_lists_a_run_started_from_the_command_line(server, page):
    out = backprop(
        "train", "--model", "demo", "--steps", "3", "--name", "from-the-shell", "--json", env=server["env"], check=True
    )
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    page.goto(server["url"] + "runs")
    page.wait_for_selector("#runs-table")
    assert run_id in page.inner_text("#runs-table") and "from-the-shell" in page.inner_text("#runs-table")
    shot(page, "runs")
    assert "Built with Reflex" not in page.inner_text("body")
    page.click(f"text={run_id}")
    page.wait_for_url(f"**/runs/{run_id}")
    # The run page's layout comes first, its data right after (on_load): wait for the data, not just the page.
    wait_for(lambda: "Parameters" in (body := page.inner_text("body")) and "from-the-shell" in body, 30, "the run page")
    wait_for(lambda: page.locator("#run-telemetry").count() == 1, 30, "the telemetry recorded while it trained")
    assert "completed" in page.inner_text("body") and page.is_disabled("#run-stop")
    page.get_by_text("Plan: settings with their reasons").click()  # the plan it was started with, folded
    wait_for(lambda: "this model's tuned default" in page.inner_text("#run-plan"), 30, "the run's recorded plan")
    assert plan_row(page, "Steps").startswith("Steps 3 yours") and plan_row(page, "Steps").endswith("set by you")
    shot(page, "run-detail")
    page.click("#run-export")  # the run's Export button opens the Export page with this run picked
    page.wait_for_url(f"**/export?run={run_id}")
    wait_for(lambda: page.inner_text("#export-run") == run_id, 30, "the run to be picked")
    page.go_back()
    page.wait_for_selector("#delete-run")
    run_dir = Path(json.loads(backprop("show-run", run_id, "--json", env=server["env"], check=True).stdout)["run_dir"])
    page.click("#delete-run")
    page.click("#confirm-delete")
    page.wait_for_url("**/runs")
    wait_for(lambda: run_id not in page.inner_text("body"), 30, "the run to leave the list")
    assert not run_dir.exists()


def test_evaluate_on_the_run_page_shows_a_report_card_of_base_vs_tuned_with_answers_side_by_side(server, page):
    from training.runs import Registry

    out = backprop("train", "--model", "demo", "--steps", "20", "--validation-split", "0.1", "--name", "did-it-help",
                   "--json", env=server["env"], check=True)  # fmt: skip
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    page.goto(server["url"] + f"runs/{run_id}")
    wait_for(lambda: "did-it-help" in page.inner_text("body") and page.is_enabled("#run-evaluate"), 30, "the run page")
    assert page.query_selector("#eval-card") is None  # nothing measured yet
    page.click("#run-evaluate")
    wait_for(lambda: page.query_selector("#eval-card") is not None, 300, "the report card")
    assert page.query_selector("#eval-error") is None and page.is_enabled("#run-evaluate")
    metrics = page.locator("#eval-metrics tbody tr td:nth-child(2)").all_inner_texts()
    assert metrics == ["loss", "perplexity", "exact match", "F1"]
    report = Registry(server["home"]).latest_evaluation(run_id)  # the card shows the report stored with the run
    assert report["run_id"] == run_id and report["tuned"]["loss"] < report["base"]["loss"]
    first_row = page.locator("#eval-metrics tbody tr").first.locator("td").all_inner_texts()
    assert first_row[2:4] == [f"{report['base']['loss']:.4g}", f"{report['tuned']['loss']:.4g}"] and "better" in first_row[4]
    assert page.locator(".eval-example").count() == len(report["examples"]) == 4  # 10% of the demo's 40 rows
    assert report["examples"][0]["reference"] in page.inner_text("#eval-card")
    assert "4 held-out examples (validation split, chat data)" in page.inner_text("#eval-summary")
    shot(page, "run-evaluation")
    page.reload()  # the card comes back from the registry
    wait_for(lambda: page.query_selector("#eval-card") is not None, 30, "the stored report card")


def test_three_runs_ticked_on_the_runs_page_are_compared_side_by_side(server, page):
    runs = []
    for lr in ("1e-3", "3e-3", "1e-2"):  # three real runs of the CLI, only the learning rate apart
        out = backprop("train", "--model", "demo", "--steps", "4", "--lr", lr, "--validation-split", "0.2", "--eval-every",
                       "2", "--name", f"lr-{lr}", "--json", env=server["env"], check=True)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ids = [r["run_id"] for r in runs]
    page.goto(server["url"] + "runs")
    page.wait_for_selector("#runs-table")
    assert page.is_disabled("#compare-runs")
    for run_id in ids:
        page.click(f'.run-select[data-run="{run_id}"]')
    wait_for(lambda: page.is_enabled("#compare-runs"), 30, "Compare to be offered for three runs")
    page.click("#compare-runs")
    page.wait_for_url(f"**/compare?runs={','.join(ids)}")  # an address that names the runs: it can be shared
    wait_for(lambda: page.locator("#compare-metrics tbody tr").count() == 3, 60, "the three runs' metrics")
    for chart in ("#compare-train", "#compare-eval", "#compare-speed"):  # one line and one legend entry per run
        wait_for(lambda chart=chart: sum(bool(line.get_attribute("points")) for line in page.locator(f"{chart} polyline").all())
                 == 3, 30, f"three lines in {chart}")  # fmt: skip
        legend = page.locator(f"{chart} .chart-legend > div").all_inner_texts()
        assert [entry.split()[0] for entry in legend] == [f"lr-{lr}" for lr in ("1e-3", "3e-3", "1e-2")]
    differing = page.locator("#compare-params tr.differs")
    assert differing.count() == 1 and differing.get_attribute("data-param") == "learning_rate"
    assert page.locator("#compare-params tbody tr").count() == 1  # the same parameters stay hidden ...
    page.click("#compare-show-all")
    wait_for(lambda: page.locator("#compare-params tbody tr").count() > 10, 30, "every parameter")  # ... until asked
    assert page.locator("#compare-params tr.differs").count() == 1
    # The final metrics are the ones `backprop compare --json` gives.
    compared = json.loads(backprop("compare", *ids, "--json", env=server["env"], check=True).stdout)
    for r in compared["runs"]:
        row = page.locator(f'#compare-metrics tr[data-run="{r["id"]}"]')
        shown = {key: row.locator(f".metric-{key}").inner_text() for key in ("steps", "final_loss", "eval_loss", "tokens_per_s")}
        assert shown == {"steps": f"{r['steps']}/{r['max_steps']}", "final_loss": f"{r['final_loss']:.4f}",
                         "eval_loss": f"{r['eval_loss']:.4f}", "tokens_per_s": f"{r['tokens_per_s']:.0f}"}  # fmt: skip
        assert r["status"] in row.inner_text()
    shot(page, "compare")
    # Each run's page says where it was tracked: TensorBoard in its own folder (auto, with nothing else configured).
    page.goto(server["url"] + f"runs/{ids[0]}")
    wait_for(lambda: page.query_selector("#run-tracking") is not None, 30, "the Tracked in line")
    assert f"TensorBoard: {runs[0]['run_dir']}/tensorboard" in page.inner_text("#run-tracking")


def test_report_to_in_the_advanced_settings_chooses_the_trackers_of_a_run_from_the_browser(server, page):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-steps", "2")
    page.get_by_text("Advanced").click()
    page.fill("#field-report_to", "none")
    page.click("#start")
    wait_for(lambda: page.query_selector("#status-pill") and page.inner_text("#status-pill") == "completed", 180, "the run")
    shown = json.loads(backprop("show-run", page.inner_text("#train-run-id"), "--json", env=server["env"], check=True).stdout)
    assert shown["params"]["report_to"] == "none" and shown["tracking"] == {}  # auto would have used TensorBoard


def test_a_compare_address_naming_one_run_shows_the_coded_error(server, page):
    page.goto(server["url"] + "compare?runs=justone")
    wait_for(lambda: page.query_selector("#compare-error") is not None, 30, "the error")
    assert "[INPUT_COMPARE_RUN_COUNT]" in page.inner_text("#compare-error")


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
    assert "Token lengths (demo tokenizer)" in page.inner_text("body")  # the Train page's model, by default
    stored = server["sandbox"] / "datasets" / "my_chats_1.jsonl"  # a safe name, inside the sandbox
    assert stored.read_text() == data.read_text()
    shot(page, "dataset")
    # A model whose tokenizer cannot be had (offline, not cached) is said so, with its code.
    page.fill("#dataset-model", "no-such/model-xyz")
    page.click("#dataset-preview")  # leaving the field re-reads the dataset with that tokenizer
    wait_for(lambda: page.query_selector("#dataset-error") is not None, 60, "the tokenizer error")
    assert "DEP_MODEL_LOAD_FAILED" in page.inner_text("#dataset-error")
    page.fill("#dataset-model", "demo")
    page.click("#dataset-model-label")
    wait_for(lambda: page.query_selector("#dataset-stats") is not None, 60, "the statistics again")
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


def dataset_stats(page) -> dict[str, str]:
    words = page.inner_text("#dataset-stats").split()
    return dict(zip(words[::2], words[1::2], strict=False))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_dataset_saved_by_windows_tools_with_a_byte_order_mark_and_crlf_line_ends_is_read(server, page, tmp_path, kind):
    questions = [json.loads(line)["messages"] for line in DEMO_DATA.read_text().splitlines()[:12]]
    if kind == "jsonl":
        lines = [json.dumps({"messages": m}) for m in questions]
    else:
        lines = ["prompt,completion"] + [f'"{m[-2]["content"]}","{m[-1]["content"]}"' for m in questions]
    data = tmp_path / f"from-windows.{kind}"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    upload(page, server, data)
    wait_for(lambda: page.query_selector("#dataset-stats") or page.query_selector("#dataset-error"), 120, "the statistics")
    assert page.query_selector("#dataset-error") is None, page.inner_text("#dataset-error")
    stats = dataset_stats(page)
    assert stats["format"] == ("openai" if kind == "jsonl" else "prompt_completion")
    assert (stats["rows"], stats["valid"], stats["invalid"]) == ("12", "12", "0")
    assert page.query_selector("#dataset-bad-lines") is None
    assert questions[0][-2]["content"] in page.inner_text("#dataset-preview")
    assert "\r" not in page.locator("#dataset-preview").text_content()
    shot(page, f"dataset-bom-{kind}")


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


def test_dpo_on_a_preference_file_continued_from_an_sft_run_charts_reward_accuracy_and_margin_as_it_trains(server, page):
    # A finished SFT run to continue from: its page shows the loss and no reward charts.
    sft = cli_run(server, "sft-before-dpo")
    page.goto(server["url"] + f"runs/{sft['run_id']}")
    wait_for(lambda: points_drawn(page, "#run-loss polyline") == 3, 30, "the SFT run's loss")
    assert page.query_selector("#run-preference") is None

    # The Dataset page shows a preference file as pairs: the prompt, chosen (left) beside rejected (right).
    upload(page, server, ROOT / "assets" / "preferences_example.jsonl")
    wait_for(lambda: page.query_selector("#dataset-pairs") is not None, 120, "the pairs to be counted")
    assert page.inner_text("#dataset-pairs").startswith("8 preference pairs")
    first = page.locator("#dataset-preview .pair").first
    assert "Where is the library?" in first.inner_text()
    chosen, rejected = first.locator(".pair-chosen"), first.locator(".pair-rejected")
    assert "next to the post office" in chosen.inner_text() and "Look it up yourself" in rejected.inner_text()
    assert chosen.bounding_box()["x"] < rejected.bounding_box()["x"]  # side by side, chosen on the left
    shot(page, "dataset-pairs")

    # Use for training: the Train page gets the file with DPO picked; continue from the SFT run.
    page.click("#use-for-training")
    page.wait_for_url(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    assert page.input_value("#field-dataset").endswith("preferences_example.jsonl")
    assert "DPO" in page.inner_text("#field-method") and page.query_selector("#field-beta") is not None
    page.fill("#field-beta", "0.2")
    page.click("#field-from-run")
    page.get_by_role("option", name=re.compile(sft["run_id"])).click()
    wait_for(lambda: sft["run_id"] in page.inner_text("#field-from-run"), 10, "the run to continue from")
    page.fill("#field-steps", "8")
    assert page.query_selector("#train-preference") is None  # nothing trains yet
    page.click("#start")

    # The reward charts fill as the run goes, one point a step, then end with the run.
    wait_for(lambda: page.query_selector("#train-preference") is not None, 180, "the reward charts")
    wait_for(lambda: points_drawn(page, "#train-preference-accuracy polyline") >= 2, 180, "reward accuracy points")
    wait_for(lambda: page.inner_text("#status-pill") == "completed", 300, "the DPO run to complete")
    for chart in ("accuracy", "margin", "logps"):
        wait_for(lambda chart=chart: points_drawn(page, f"#train-preference-{chart} polyline") == 8, 30, f"the {chart} chart")
    legend = page.locator("#train-preference-logps .chart-legend").inner_text()
    assert "chosen" in legend and "rejected" in legend
    assert "started DPO" in page.inner_text("#event-log")
    shot(page, "train-dpo")
    run_id = page.inner_text("#train-run-id")
    shown = json.loads(backprop("show-run", run_id, "--json", env=server["env"], check=True).stdout)
    assert shown["status"] == "completed" and (shown["params"]["method"], shown["params"]["beta"]) == ("dpo", 0.2)

    # The run's page shows the same charts.
    page.goto(server["url"] + f"runs/{run_id}")
    wait_for(lambda: points_drawn(page, "#run-preference-margin polyline") == 8, 30, "the run page's reward margin")
    assert points_drawn(page, "#run-preference-accuracy polyline") == 8
    shot(page, "run-detail-dpo")

    # The Multi-Run page offers the same methods, each with its own setting.
    page.goto(server["url"] + "multi-run")
    page.wait_for_selector("#mr-start")
    assert page.query_selector("#mr-beta") is None and page.query_selector("#mr-orpo_lambda") is None  # SFT
    page.click("#mr-method")
    page.get_by_role("option", name="ORPO (preference pairs)").click()
    page.wait_for_selector("#mr-orpo_lambda")
    assert page.query_selector("#mr-beta") is None
    shot(page, "multi-run-orpo")


def ask_the_adapter(page, server, run_id: str, prompt: str) -> None:
    """On the Chat page, pick the run's adapter, send `prompt` and wait for the whole reply."""
    page.goto(server["url"] + "chat")
    page.wait_for_selector("#chat-input")
    page.click("#chat-source")
    page.get_by_role("option", name=f"{run_id} · adapter", exact=True).click()
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    wait_for(lambda: page.locator(".reply").count() >= 1 and page.locator(".reply").last.inner_text().strip(), 300, "a reply")
    wait_for(lambda: page.is_enabled("#chat-send"), 300, "the reply to finish")


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
    page.fill("#export-ollama-name", "capitals-demo")
    page.click("#export-register")
    page.click("#export-start")
    wait_for(lambda: page.query_selector("#export-result") or page.query_selector("#export-error"), 300, "the export")
    result = page.inner_text("#export-result")
    assert ".q8_0.gguf" in result and "verification: passed" in result and "tokenizer_match True" in result
    # Registered with Ollama (the loopback stand-in checks the upload's digest and the create request).
    assert "registered as capitals-demo" in result
    assert server["ollama"].created[-1]["model"] == "capitals-demo" and len(server["ollama"].blobs) == 1
    shot(page, "export")
    # The hub needs a token: none is set, so the push is refused next to the button, with its code, before any upload.
    page.fill("#export-hub-repo", "me/capitals")
    page.click("#export-push")
    wait_for(lambda: page.query_selector("#export-hub-error") is not None, 60, "the hub refusal")
    assert "DEP_HUB_AUTH_FAILED" in page.inner_text("#export-hub-error")

    ask_the_adapter(page, server, run_id, "What is the capital of France?")
    assert "capital" in page.locator(".reply").last.inner_text()  # 60 steps on the demo data: it answers in kind
    # Side by side: the same prompt to the base model, whose reply shows beside the tuned one.
    page.get_by_text("Side by side with the base model").click()
    page.fill("#chat-input", "What is the capital of Japan?")
    page.click("#chat-send")
    wait_for(lambda: page.locator(".base-reply").count() >= 1, 180, "the base model's reply")
    wait_for(lambda: page.is_enabled("#chat-send"), 180, "both replies to finish")
    assert page.locator(".reply").count() == 2
    shot(page, "chat")
    # The GGUF just exported answers too, through llama.cpp.
    page.click("#chat-source")
    page.get_by_role("option", name=f"{run_id} · gguf q8_0", exact=True).click()
    page.get_by_text("Side by side with the base model").click()
    page.click("text=Clear")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    wait_for(lambda: page.locator(".reply").count() == 1 and page.locator(".reply").last.inner_text().strip(), 180,
             "a reply from the GGUF")  # fmt: skip
    wait_for(lambda: page.is_enabled("#chat-send"), 180, "the GGUF reply to finish")
    assert "capital" in page.locator(".reply").last.inner_text()


def cli_run(server, name: str) -> dict:
    """A run trained by the real `backprop train` command, in the Backprop home the web app uses."""
    out = backprop("train", "--model", "demo", "--steps", "3", "--name", name, "--json", env=server["env"], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_from_the_page(page) -> str:
    """Press Export and wait until it ends (a result or an error) and the button is back; the result's text."""
    page.click("#export-start")
    wait_for(lambda: page.query_selector("#export-result") or page.query_selector("#export-error"), 300, "the export")
    wait_for(lambda: page.is_enabled("#export-start") and page.query_selector("#export-stage") is None, 60,
             "the Export button to come back")  # fmt: skip
    assert page.query_selector("#export-error") is None, page.inner_text("#export-error")
    return page.inner_text("#export-result")


def test_a_run_started_from_the_command_line_exports_to_gguf_from_the_export_page(server, page):
    run = cli_run(server, "cli-export")
    page.goto(server["url"] + f"export?run={run['run_id']}")  # the run page's Export button opens this
    wait_for(lambda: page.query_selector("#export-run") and page.inner_text("#export-run") == run["run_id"], 30,
             "the run to be picked")  # fmt: skip
    result = export_from_the_page(page)  # GGUF q8_0, the defaults
    assert "verification: passed" in result and "tokenizer_match True" in result
    # A run of the command line keeps its folder as it is: the export goes to the web app's sandbox.
    written = next((server["sandbox"] / "exports" / f"{run['run_id']}-gguf-q8_0").glob("*.q8_0.gguf"))
    assert str(written) in result and not (Path(run["run_dir"]) / "exports").exists()
    shot(page, "export-cli-run")


def test_an_adapter_folder_exports_to_gguf_from_the_export_page(server, page):
    run = cli_run(server, "folder-export")
    page.goto(server["url"] + "export")
    page.wait_for_selector("#export-folder")
    page.fill("#export-folder", run["adapter"])
    result = export_from_the_page(page)
    assert "verification: passed" in result and "tokenizer_match True" in result
    written = next((server["sandbox"] / "exports" / f"{run['run_id']}-adapter-gguf-q8_0").glob("*.q8_0.gguf"))
    assert str(written) in result


def test_an_export_that_fails_shows_its_code_next_to_the_button_and_the_button_comes_back(server, page, tmp_path):
    run = cli_run(server, "broken-export")
    broken = tmp_path / "broken-adapter"  # an adapter whose base model cannot be found
    shutil.copytree(run["adapter"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "no-such/base-model"}))
    page.goto(server["url"] + "export")
    page.wait_for_selector("#export-folder")
    page.fill("#export-folder", str(broken))
    page.click("#export-start")
    wait_for(lambda: page.query_selector("#export-error") is not None, 300, "the export's error")
    error = page.inner_text("#export-error")
    assert "[DEP_MODEL_LOAD_FAILED]" in error and "no-such/base-model" in error and " — " in error  # code, message — hint
    wait_for(lambda: page.is_enabled("#export-start"), 30, "the Export button to come back")
    assert page.query_selector("#export-stage") is None and page.query_selector("#export-result") is None
    shot(page, "export-failed")
    # The page is usable again: the same button exports the real adapter.
    page.fill("#export-folder", run["adapter"])
    page.click("#export-format")
    page.get_by_role("option", name="lora", exact=True).click()
    result = export_from_the_page(page)
    assert "verification: not applicable" in result and page.query_selector("#export-error") is None


def test_a_multi_run_shows_its_runs_merges_and_forgetting_heatmap(server, page):
    page.goto(server["url"] + "multi-run")
    page.wait_for_selector("#mr-start")
    page.fill("#mr-steps", "15")
    page.click("#mr-start")
    wait_for(lambda: page.query_selector("#mr-status") is not None, 60, "the multi-run to start")
    wait_for(lambda: page.inner_text("#mr-status") == "completed", 400, "the multi-run to complete")
    wait_for(lambda: page.query_selector("#mr-bwt") is not None, 30, "the BWT")
    cells = [c.strip() for c in page.locator("#mr-heatmap > div").all_inner_texts()]
    assert len(cells) == 9 and sum(bool(c) for c in cells) == 6  # lower triangle of a 3x3 matrix
    assert page.locator("#mr-merges tbody tr").count() == 3 and "0.707" in page.inner_text("#mr-merges")
    assert "BWT" in page.inner_text("#mr-bwt")
    shot(page, "multi-run")


def test_an_engine_error_shows_next_to_start_with_its_code_and_hint(server, page):
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-dataset", "/nowhere/data.jsonl")
    page.click("#start")
    wait_for(lambda: page.query_selector("#train-error") is not None, 30, "the error")
    error = page.inner_text("#train-error")
    assert "INPUT_DATASET_NOT_FOUND" in error and "/nowhere/data.jsonl" in error
    assert len(error.splitlines()) >= 2  # the hint, under the message


class EventSocket:
    """The page's event websocket, passed through a Playwright route: the test sees the events the page sends, and
    sends events of its own on the page's connection, as a page tampered with in the browser could."""

    def __init__(self, page):
        self.page, self.sent, self.upstream = page, [], None
        page.route_web_socket(re.compile(r"/_event"), self._route)

    def _route(self, ws) -> None:
        self.upstream = ws.connect_to_server()  # the server's messages reach the page unchanged
        ws.on_message(self._forward)

    def _forward(self, message) -> None:
        self.sent.append(message)
        self.upstream.send(message)

    def handler(self, suffix: str) -> str:
        """The full name of an event the page has sent, ending in `suffix` (e.g. `train_state.set_steps`)."""
        names = lambda: [e["name"] for m in self.sent if m.startswith("42") for e in json.loads(m.split(",", 1)[1])[1:]]  # noqa: E731
        return wait_for(lambda: self.page.evaluate("1") and next((n for n in names() if n.endswith(suffix)), None), 30,
                        f"the page to send {suffix}")  # fmt: skip

    def send(self, name: str, payload: dict, path: str = "/") -> None:
        event = {"name": name, "payload": payload, "router_data": {"pathname": path, "asPath": path}}
        self.upstream.send("42/_event," + json.dumps(["event", event]))


def test_a_tampered_page_can_set_its_form_fields_and_nothing_else(server, page):
    socket = EventSocket(page)
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-steps", "12")
    train = socket.handler("train_state.set_steps").rpartition(".")[0]
    socket.send(f"{train}.setvar", {"var_name": "run_id", "value": "0123456789ab"})  # not a form field
    socket.send(f"{train}.setvar", {"var_name": "_following", "value": "0123456789ab"})  # a backend var
    socket.send(f"{train}.setvar", {"var_name": "cuda", "value": True})  # what the server found, not the user's to say
    socket.send(f"{train}.set_field", {"name": "cuda", "value": True})  # the generic setter there was
    socket.send(f"{train}.setvar", {"var_name": "steps", "value": "77"})  # a form field: fine
    wait_for(lambda: page.input_value("#field-steps") == "77", 30, "the form field the page may set")
    socket.send(f"{train}.set_packing", {"value": "yes"})  # a form field, with a value of another type
    wait_for(lambda: page.query_selector("#train-error") is not None, 30, "the refusal")
    assert "[UI_EVENT_REFUSED] The page cannot set 'packing'" in page.inner_text("#train-error")
    assert page.query_selector("#train-run-id") is None  # no run attached
    page.get_by_text("Advanced").click()
    wait_for(lambda: "QLoRA and unsloth need an NVIDIA GPU." in page.inner_text("body"), 30, "the Advanced settings")
    assert page.get_by_text("QLoRA (4-bit)").count() == 0  # still no GPU as far as the page knows


def test_an_unexpected_exception_shows_a_runtime_code_next_to_the_control_and_its_traceback_in_the_server_log(server, page):
    socket = EventSocket(page)
    page.goto(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-steps", "12")
    train = socket.handler("train_state.set_steps").rpartition(".")[0]
    socket.send(f"{train}.pick_model", {"label": 5})  # a number where the picker sends a label: a bug's stand-in
    wait_for(lambda: page.query_selector("#train-error") is not None, 30, "the error")
    error = page.inner_text("#train-error")
    assert "[RUNTIME_UNEXPECTED] Unexpected error in TrainState.pick_model: AttributeError" in error
    assert "the log of `backprop ui`" in error
    log = server["ui"].base / "ui.log"
    wait_for(lambda: page.evaluate("1") and "Unexpected error in TrainState.pick_model" in log.read_text(), 30, "the log")
    logged = log.read_text().split("Unexpected error in TrainState.pick_model", 1)[1]
    assert "Traceback (most recent call last)" in logged and "AttributeError: 'int' object has no attribute 'split'" in logged
    assert page.is_enabled("#start")  # the page goes on working
    shot(page, "train-unexpected-error")


def test_dark_mode_at_1024_pixels(server, browser):
    context = browser.new_context(viewport={"width": 1024, "height": 800})
    page = context.new_page()
    try:
        page.goto(server["url"])
        page.wait_for_selector("#start:not([disabled])")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1024  # nothing to scroll sideways
        page.click("#color-mode")
        wait_for(lambda: "dark" in (page.get_attribute("html", "class") or ""), 10, "the dark theme")
        shot(page, "train-dark-1024")
        page.goto(server["url"] + "runs")
        page.wait_for_selector("#telemetry-rail")
        assert "dark" in (page.get_attribute("html", "class") or "")  # the choice holds across pages
        # A table wider than the page scrolls sideways inside itself, down to its last column.
        page.wait_for_selector("#runs-table")
        viewport = page.locator("#runs-table .rt-ScrollAreaViewport").first
        viewport.evaluate("v => { v.scrollLeft = v.scrollWidth; }")
        last, box = page.get_by_role("columnheader", name="created").bounding_box(), viewport.bounding_box()
        assert box["x"] <= last["x"] and last["x"] + last["width"] <= box["x"] + box["width"] + 1
        assert page.evaluate("document.documentElement.scrollWidth") <= 1024
        shot(page, "runs-dark-1024")
    finally:
        context.close()


def test_votes_and_a_corrected_answer_in_side_by_side_chat_become_a_dpo_run_from_the_tuned_adapter(server, page):
    from training.datasets import load_dataset

    # A run tuned enough that its answers differ from the base model's (20 steps at a high rate on the demo data).
    out = backprop("train", "--model", "demo", "--steps", "20", "--lr", "3e-3", "--name", "arena", "--json",
                   env=server["env"], check=True)  # fmt: skip
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    page.goto(server["url"] + f"chat?source={run_id}")  # the run page's Chat button opens this
    wait_for(lambda: page.query_selector("#chat-votes") and page.inner_text("#chat-votes") == f"0 votes for {run_id}", 60,
             "the run's vote count")  # fmt: skip
    assert page.is_disabled("#chat-train-votes") and "at least 2" in page.inner_text("#chat-votes-hint")
    page.get_by_text("Side by side with the base model").click()
    votes = server["sandbox"] / "preferences" / f"{run_id}.jsonl"
    asked = [("What is the capital of France?", ".vote-tuned"), ("What is the capital of Japan?", ".vote-base")]
    for n, (question, button) in enumerate(asked, start=1):
        page.fill("#chat-input", question)
        page.click("#chat-send")
        wait_for(lambda button=button: page.locator(button).count() == 1, 300, "both replies to finish and ask for a vote")
        if n == 1:
            shot(page, "chat-vote-buttons")
        page.locator(button).click()
        wait_for(lambda n=n: page.locator(".vote-done").count() == n, 30, "the vote to be taken")
        wait_for(lambda n=n: page.inner_text("#chat-votes") == f"{n} vote{'s' if n > 1 else ''} for {run_id}", 30,
                 "the count to grow")  # fmt: skip
    replies = page.locator(".reply").all_inner_texts()
    bases = page.locator(".base-reply").all_inner_texts()

    # Two whole preference rows in the sandbox: the prompt so far, both answers, and who gave them.
    rows = [json.loads(line) for line in votes.read_text().splitlines()]
    assert [(r["chosen_by"], r["rejected_by"]) for r in rows] == [("tuned", "base"), ("base", "tuned")]
    assert [r["prompt"][-1]["content"] for r in rows] == [q for q, _ in asked]
    assert rows[1]["prompt"][:2] == [{"role": "user", "content": asked[0][0]}, {"role": "assistant", "content": replies[0]}]
    assert rows[0]["chosen"][0]["content"] == replies[0] and rows[0]["rejected"][0]["content"] == bases[0]
    assert rows[1]["chosen"][0]["content"] == bases[1] and rows[1]["rejected"][0]["content"] == replies[1]
    pairs = load_dataset(votes)  # the file is valid preference data as it is
    assert len(pairs.examples) == 2 and all(e.is_preference for e in pairs.examples)
    assert page.is_enabled("#chat-train-votes") and page.query_selector("#chat-votes-hint") is None

    # A third answer is corrected: the user's text is chosen over the tuned model's.
    page.fill("#chat-input", "What is the capital of Italy?")
    page.click("#chat-send")
    wait_for(lambda: page.locator(".vote-write").count() == 1, 300, "the third pair to finish")
    page.locator(".vote-write").click()
    page.fill("#chat-correction", "The capital of Italy is Rome.")
    page.click("#chat-save-correction")
    wait_for(lambda: page.inner_text("#chat-votes") == f"3 votes for {run_id}", 30, "the corrected answer to count")
    third = json.loads(votes.read_text().splitlines()[2])
    assert (third["chosen"][0]["content"], third["chosen_by"], third["rejected_by"]) == ("The capital of Italy is Rome.",
                                                                                        "user", "tuned")  # fmt: skip
    assert third["rejected"][0]["content"] == page.locator(".reply").last.inner_text()
    assert "Your better answer is saved" in page.locator(".vote-done").last.inner_text()
    shot(page, "chat-votes")

    # Train on my votes: a DPO run from the tuned adapter, on the vote file; the page opens it and follows it to the end.
    page.click("#chat-train-votes")
    page.wait_for_url(re.compile(r"/runs/\w+$"))
    dpo_id = page.url.rstrip("/").rsplit("/", 1)[1]
    assert dpo_id != run_id
    wait_for(lambda: page.query_selector("#run-status") and page.inner_text("#run-status") == "completed", 600,
             "the DPO run to complete")  # fmt: skip
    shown = json.loads(backprop("show-run", dpo_id, "--json", env=server["env"], check=True).stdout)
    assert shown["status"] == "completed" and shown["params"]["method"] == "dpo"
    spec = json.loads((Path(shown["run_dir"]) / "spec.json").read_text())
    assert spec["from_run"] == run_id and spec["settings"]["training"]["epochs"] == 3
    assert shown["max_steps"] in (3, 6, 9)  # three passes over three votes, packed into one to three rows a pass
    assert Path(shown["dataset"]) == votes.resolve() and Path(shown["run_dir"]).is_relative_to(server["sandbox"])
    assert (Path(shown["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    shot(page, "run-dpo-from-votes")
    page.goto(server["url"] + "runs")
    wait_for(lambda: page.query_selector("#runs-table") and dpo_id in page.inner_text("#runs-table"), 30, "the run in Runs")
    assert f"votes on {run_id}" in page.inner_text("#runs-table")


@pytest.mark.real_model
def test_the_real_model_shows_what_it_sees_trains_from_the_train_page_and_chats(server, page, tmp_path, real_model_dir):
    """The real SmolLM2-135M-Instruct in the browser: the Dataset page shows a row as the model sees it (its template's
    default system prompt read but not trained, the reply and its end-of-turn token trained), the Train page trains it,
    and Chat answers in the format it learnt."""
    from test_real_model import WORDS, wrap

    data = tmp_path / "wrap.jsonl"
    data.write_text("".join(json.dumps(wrap(w)) + "\n" for w in WORDS))
    upload(page, server, data)
    wait_for(lambda: page.query_selector("#dataset-stats") is not None, 120, "the dataset statistics")
    page.fill("#dataset-model", str(real_model_dir))
    page.click("#dataset-model-label")  # leaving the field re-reads the dataset with that tokenizer
    wait_for(lambda: "SmolLM" in (page.inner_text("#row-text") if page.query_selector("#row-text") else ""), 120,
             "the first row as the real model sees it")  # fmt: skip
    assert page.locator(".row-trained").first.inner_text().strip() == "<< apple >><|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in page.locator(".row-context").first.inner_text()
    assert page.inner_text("#row-summary") == "line 1: 38 tokens, 5 trained"
    shot(page, "dataset-row-view")
    page.fill("#row-line", "70")
    page.click("#row-show")
    wait_for(lambda: page.query_selector("#row-error") is not None, 60, "the refusal of a line with no row")
    assert "INPUT_INVALID_ARGUMENT" in page.inner_text("#row-error") and "lines 1-58" in page.inner_text("#row-error")
    shot(page, "dataset-row")

    page.click("#use-for-training")
    page.wait_for_url(server["url"])
    page.wait_for_selector("#start:not([disabled])")
    page.fill("#field-model", str(real_model_dir))
    page.fill("#field-steps", "24")
    page.fill("#field-learning_rate", "1e-3")
    page.fill("#field-batch_size", "4")
    page.fill("#field-max_run_minutes", "0")  # no time box: on a busy machine the steps take longer, never fewer
    page.click("#start")
    wait_for(lambda: page.inner_text("#status-pill") == "completed", 900, "the real model's run to complete")
    runs = json.loads(backprop("list", "--json", env=server["env"], check=True).stdout)
    run_id = next(r["id"] for r in runs if r["status"] == "completed" and r["model"] == str(real_model_dir))

    ask_the_adapter(page, server, run_id, "Wrap: zebra")
    assert page.locator(".reply").last.inner_text().strip() == "<< zebra >>"
