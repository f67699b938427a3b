"""Experiment tracking from real training runs, read back with each tracker's own reader (offline, loopback only)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import backprop
from training.events import read_events

TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "NETRC")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No tracker configured from outside the test; no netrc with a W&B key."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def train(*flags: str, env: dict | None = None) -> dict:
    """A demo run to its end. `backprop train` returns once the worker has closed the trackers, too."""
    result = backprop("train", "--model", "demo", "--steps", "8", "--json", *flags, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def events_of(run_dir: Path) -> list[dict]:
    return read_events(run_dir / "events.jsonl")[0]


def steps_of(run_dir: Path) -> dict[int, dict]:
    return {e["step"]: e for e in events_of(run_dir) if e["event"] == "step"}


def tracker_warnings(run_dir: Path) -> list[dict]:
    return [e for e in events_of(run_dir) if e["event"] == "log" and e.get("code") == "DEP_TRACKER_FAILED"]


# ---------------------------------------------------------------------------- all three trackers on one run


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One demo run logged to TensorBoard, a local MLflow store and W&B offline at once."""
    root = tmp_path_factory.mktemp("tracked")
    home = root / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    env = {name: "" for name in TRACKER_ENV}
    env.update(BACKPROPAGATE_HOME=str(home), BACKPROPAGATE_MIN_FREE_RAM_GB="0.25", BACKPROPAGATE_MAX_CPU_PERCENT="100",
               MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true", WANDB_MODE="offline",
               NETRC=str(root / "no-netrc"))  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = train("--report-to", "tensorboard,mlflow,wandb", "--validation-split", "0.2", "--eval-every", "4")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out["run_id"], Path(out["run_dir"]), root


def test_a_tracked_run_says_where_it_was_tracked_in_tracking_json_and_its_events(tracked_run):
    run_id, run_dir, root = tracked_run
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert tracking["tensorboard"] == str(run_dir / "tensorboard")
    assert tracking["mlflow"]["tracking_uri"] == (root / "mlruns").as_uri()
    assert tracking["wandb"]["url"] is None and Path(tracking["wandb"]["offline_dir"]).is_dir()
    event = next(e for e in events_of(run_dir) if e["event"] == "tracking")
    assert event["run_id"] == run_id and event["mlflow"]["run_id"] == tracking["mlflow"]["run_id"]
    assert tracker_warnings(run_dir) == []
    shown = backprop("show-run", run_id, "--json", env={"BACKPROPAGATE_HOME": str(root / "home")}, check=True)
    assert json.loads(shown.stdout)["tracking"] == tracking


def test_tensorboard_holds_every_step_and_eval_of_the_run(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = tracked_run
    steps = steps_of(run_dir)
    evals = {e["step"]: e["eval_loss"] for e in events_of(run_dir) if e["event"] == "eval"}
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    for name, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                      ("train/tokens_per_s", "tokens_per_s")):  # fmt: skip
        scalars = accumulator.Scalars(name)
        assert [s.step for s in scalars] == sorted(steps)
        assert [s.value for s in scalars] == pytest.approx([steps[s][key] for s in sorted(steps)], rel=1e-5)
    assert {s.step: s.value for s in accumulator.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-5)
    assert len(evals) == 2  # step 4 and the final one


def test_mlflow_holds_the_params_and_the_loss_history_of_the_run(tracked_run):
    from mlflow.tracking import MlflowClient

    run_id, run_dir, root = tracked_run
    tracking = json.loads((run_dir / "tracking.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    run = client.get_run(tracking["mlflow"]["run_id"])
    assert run.info.run_name == f"backprop-{run_id}" and run.info.status == "FINISHED"
    assert run.data.tags["backprop.run_id"] == run_id
    spec = json.loads((run_dir / "spec.json").read_text())
    assert run.data.params["learning_rate"] == str(spec["params"]["learning_rate"])
    assert run.data.params["model"] == "demo" and run.data.params["dataset"] == "capitals.jsonl"
    assert len(run.data.params["dataset_sha256"]) == 64
    steps = steps_of(run_dir)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [s for s, _ in history] == sorted(steps)
    assert [v for _, v in history] == pytest.approx([steps[s]["loss"] for s in sorted(steps)], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [4, 8]
    assert client.get_metric_history(run.info.run_id, "system/cpu_percent")  # the telemetry sampler's readings


def wandb_records(path: Path):
    """The records of a .wandb file, decoded with wandb's own protobuf. wandb 0.31 ships no Python reader (its
    DataStore went with the Go core); the file is a LevelDB-style log: 7-byte header, 32 KiB blocks of chunks."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += chunk


def test_wandb_offline_keeps_the_run_and_its_metrics_in_the_run_folder(tracked_run):
    run_id, run_dir, _ = tracked_run
    offline = Path(json.loads((run_dir / "tracking.json").read_text())["wandb"]["offline_dir"])
    assert offline.parent == run_dir / "wandb"
    records = list(wandb_records(offline / f"run-{run_id}.wandb"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.display_name == f"backprop-{run_id}"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"] == "demo" and config["run_id"] == run_id
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    steps = steps_of(run_dir)
    logged = {s: row["train/loss"] for s, row in history.items() if "train/loss" in row}
    assert logged == pytest.approx({s: e["loss"] for s, e in steps.items()}, rel=1e-6)


# ---------------------------------------------------------------------------- trouble and defaults


class FlakyMlflow(BaseHTTPRequestHandler):
    """An MLflow server that lets a run start, then refuses every batch of metrics (a store gone bad mid-run)."""

    metric_batches = 0

    def do_GET(self):  # noqa: N802
        if "experiments/get-by-name" in self.path:
            return self._send(200, {"experiment": {"experiment_id": "1", "name": "backprop", "lifecycle_stage": "active",
                                                   "artifact_location": "mlflow-artifacts:/1"}})  # fmt: skip
        self._send(200, {})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.endswith("runs/create"):
            return self._send(200, {"run": {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1",
                                                     "run_name": body.get("run_name"), "status": "RUNNING",
                                                     "start_time": 0, "lifecycle_stage": "active"}, "data": {}}})  # fmt: skip
        if self.path.endswith("runs/log-batch") and body.get("metrics"):
            FlakyMlflow.metric_batches += 1
            return self._send(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "metric store is full"})
        self._send(200, {})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_tracker_failing_mid_run_is_one_coded_warning_and_training_completes(home, clean_env):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = train("--report-to", "mlflow,tensorboard", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()
    run_dir = Path(out["run_dir"])
    assert out["status"] == "completed" and out["steps"] == 8
    assert FlakyMlflow.metric_batches >= 1  # the run started on the server, then its metrics were refused
    warnings = tracker_warnings(run_dir)
    assert len(warnings) == 1 and warnings[0]["tracker"] == "mlflow" and warnings[0]["level"] == "warning"
    assert "metric store is full" in warnings[0]["message"]
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert "mlflow" in tracking["failed"] and tracking["mlflow"]["run_id"] == "r1"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(tracking["tensorboard"])
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("train/loss")] == list(range(1, 9))  # the other tracker went on


def test_an_unreachable_mlflow_server_at_start_is_one_coded_warning(home, clean_env):
    out = train(
        "--report-to", "mlflow", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )
    assert out["status"] == "completed"
    warnings = tracker_warnings(Path(out["run_dir"]))
    assert [w["tracker"] for w in warnings] == ["mlflow"]


def test_auto_with_nothing_configured_logs_only_to_tensorboard(home, clean_env):
    out = train()  # --report-to left at its default, auto
    run_dir = Path(out["run_dir"])
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert set(tracking) == {"tensorboard"}
    assert not (run_dir / "wandb").exists() and not (run_dir / "mlruns").exists()
    assert tracker_warnings(run_dir) == []


def test_report_to_none_tracks_nothing_and_an_unknown_tracker_is_a_config_error(home, clean_env):
    out = train("--report-to", "none")
    assert not (Path(out["run_dir"]) / "tracking.json").exists()
    assert not (Path(out["run_dir"]) / "tensorboard").exists()
    refused = backprop("train", "--model", "demo", "--report-to", "neptune")
    assert refused.returncode == 1 and "[CONFIG_INVALID]" in refused.stderr and "neptune" in refused.stderr


def test_the_library_takes_report_to_as_a_list_or_a_string():
    from training.config import load_settings, nest_options

    assert load_settings(**nest_options({"report_to": ["wandb", "TensorBoard"]})).training.report_to == "wandb,tensorboard"
    assert load_settings(**nest_options({"report_to": "mlflow, wandb"})).training.report_to == "mlflow,wandb"
    assert load_settings().training.report_to == "auto"


def test_a_multi_run_is_tracked_as_itself_and_as_one_tracker_run_per_child(home, clean_env, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import DEMO_DATA
    from training.runs import Registry

    store = (tmp_path / "mlruns").as_uri()
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--runs", "2", "--steps", "6", "--samples", "13",
                   "--validation", "0.25", "--report-to", "tensorboard,mlflow", "--json", env=env, check=True)  # fmt: skip
    registry = Registry(home)
    parent = registry.get(json.loads(out.stdout.strip().splitlines()[-1])["run_id"])
    assert parent.status == "completed"
    children = registry.children(parent.id)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    parent_tracking = json.loads((parent.path / "tracking.json").read_text())
    parent_mlflow = client.get_run(parent_tracking["mlflow"]["run_id"])
    assert parent_mlflow.info.run_name == f"backprop-{parent.id}"
    # The whole timeline on one axis, the forgetting matrix's rows, and BWT.
    assert [m.step for m in client.get_metric_history(parent_mlflow.info.run_id, "train/loss")] == list(range(1, 13))
    assert len(client.get_metric_history(parent_mlflow.info.run_id, "forgetting/task_1")) == 2
    assert "final/bwt" in parent_mlflow.data.metrics
    assert json.loads(parent_mlflow.data.tags["backprop.forgetting_matrix"]) == registry.forgetting(parent.id)
    for child in children:
        tracking = json.loads((child.path / "tracking.json").read_text())
        run = client.get_run(tracking["mlflow"]["run_id"])
        assert run.info.run_name == f"backprop-{child.id}"
        assert run.data.tags["mlflow.parentRunId"] == parent_mlflow.info.run_id
        assert run.data.params["dataset_sha256"] == child.dataset_sha256
        child_steps = {e["step"]: e["loss"] for e in events_of(child.path) if e["event"] == "step"}
        accumulator = EventAccumulator(tracking["tensorboard"])
        accumulator.Reload()
        assert {s.step: s.value for s in accumulator.Scalars("train/loss")} == pytest.approx(child_steps, rel=1e-5)
    assert tracker_warnings(parent.path) == []
