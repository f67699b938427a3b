"""The web app's cost: the same job started from the browser and from the command line, and UI latency under load.

1. Throughput: the demo job (400 steps) started by pressing Start training in a real browser (Playwright + Debian's
   chromium, the production build served by `backprop ui`; the tab stays on the Train page, watching, until the run
   completes), and started with `backprop train`; alternating, three rounds each. Per job: tokens / step time summed
   over the steps after warm-up. Printed: medians and the ratio browser / CLI (target >= 0.95).
2. Event round trip while a job trains: on the Runs page, typing in the search box sends an event to the server, which
   filters the registry and sends the new table back; the time from the keystroke to the table changing on screen is
   measured in the browser (MutationObserver, performance.now()) 40 times; it includes the search box's 50 ms debounce.
   Printed: median and p95 (target p95 <= 100 ms).

Run: .venv/bin/python benchmarks/ui_overhead.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, STEPS = 3, 400
sys.path.insert(0, str(ROOT))


def throughput(run_dir: Path) -> float:
    from training.events import read_events

    tokens = seconds = 0.0
    for e in read_events(run_dir / "events.jsonl")[0]:
        if e["event"] == "step" and e["step"] > 20:
            tokens += e["tokens"]
            seconds += e["tokens"] / e["tokens_per_s"]
    return tokens / seconds


def backprop(env: dict, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "training.cli", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="backprop-ui-bench-"))
    env = {**os.environ, "BACKPROPAGATE_HOME": str(work / "home"), "BACKPROPAGATE_UI__OUTPUT_DIR": str(work / "sandbox"),
           "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25", "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "training.cli", "ui", "--no-browser", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            backprop(env, "train", "--model", "demo", "--steps", "5", "--json")  # builds the demo model once, off the clock

            def from_browser() -> float:
                page = browser.new_page(viewport={"width": 1280, "height": 900})  # a new tab: no state from the last run
                page.goto(url)
                page.wait_for_selector("#start:not([disabled])")
                before = page.inner_text("#train-run-id") if page.query_selector("#train-run-id") else ""
                page.fill("#field-steps", str(STEPS))
                page.click("#start")
                page.wait_for_function(
                    "(before) => { const id = document.querySelector('#train-run-id'); return id && id.innerText !== before &&"
                    " document.querySelector('#status-pill').innerText === 'completed'; }",
                    arg=before, timeout=600_000,
                )  # fmt: skip
                run_id = page.inner_text("#train-run-id")
                page.close()  # a tab left open would keep drawing the telemetry rail during the next job
                cpu = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
                print(f"  browser run {run_id}; busiest processes at the end:", *[line[:110] for line in cpu.splitlines()[1:5]],
                      sep="\n    ")  # fmt: skip
                return throughput(Path(backprop(env, "show-run", run_id, "--json")["run_dir"]))

            def from_cli() -> float:
                return throughput(Path(backprop(env, "train", "--model", "demo", "--steps", str(STEPS), "--json")["run_dir"]))

            ui, cli = [], []
            for round_index in range(ROUNDS):
                for side in ("ui", "cli") if round_index % 2 == 0 else ("cli", "ui"):
                    rate = from_browser() if side == "ui" else from_cli()
                    (ui if side == "ui" else cli).append(rate)
                    print(f"round {round_index + 1}: {side:3} {rate:8.1f} tokens/s", flush=True)
            print(f"throughput  browser {statistics.median(ui):.1f}  CLI {statistics.median(cli):.1f}  "
                  f"ratio {statistics.median(ui) / statistics.median(cli):.3f}  (target >= 0.95)\n")  # fmt: skip

            # Round trips while a job trains.
            backprop(env, "train", "--model", "demo", "--steps", "3", "--name", "alpha", "--json")
            busy = [
                sys.executable,
                "-m",
                "training.cli",
                "train",
                "--model",
                "demo",
                "--steps",
                "100000",
                "--name",
                "busy",
                "--json",
            ]
            job = subprocess.Popen(busy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(8)
            page.goto(url + "runs")
            page.wait_for_selector("#runs-table")
            latencies = []
            for i in range(40):
                text = "alpha" if i % 2 == 0 else "busy"
                ms = page.evaluate(
                    """async (text) => {
                        const table = document.querySelector('#runs-table');
                        const before = table.innerText;
                        const input = document.querySelector('#run-search');
                        const changed = new Promise(resolve => new MutationObserver((_, obs) => {
                            if (table.innerText !== before) { obs.disconnect(); resolve(performance.now()); }
                        }).observe(table, {subtree: true, childList: true, characterData: true}));
                        const start = performance.now();
                        const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
                        setter.call(input, text);
                        input.dispatchEvent(new Event('input', {bubbles: true}));
                        return (await changed) - start;
                    }""",
                    text,
                )
                latencies.append(ms)
            job.send_signal(signal.SIGINT)
            job.wait(timeout=120)
            latencies.sort()
            p95 = latencies[int(0.95 * (len(latencies) - 1))]
            print(f"event round trip while training (n={len(latencies)}): median {statistics.median(latencies):.1f} ms, "
                  f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms  (target p95 <= 100 ms)")  # fmt: skip
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
