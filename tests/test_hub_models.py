"""Hub models and datasets through a stand-in hub on 127.0.0.1 (tests/fake_hub.py), with the user's real code paths:
`backprop train --model owner/tiny` downloads with progress and reuses the cache, a killed download resumes, an
unreachable hub fails fast with a coded error, the time box does not count the download, and `--data owner/name`
trains on every shard of a dataset's train split and evaluates on its validation split.

The model is the session's tiny demo model served as `owner/tiny`. Every process started here gets an empty HF cache
of its own (HF_HOME under the test's tmp folder) and the stand-in's address (HF_ENDPOINT).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop, wait_for
from fake_hub import COMMIT, FakeHub

from training.cli.follow import StageLine
from training.download import MB, DownloadEvents, model_files
from training.events import read_events
from training.runs import ACTIVE, Registry

CACHE = "hub/models--owner--tiny"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF cache for the processes this test starts; online, but the hub stays the closed port of conftest."""
    folder = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return folder


def serve(monkeypatch, **options) -> FakeHub:
    """A stand-in hub serving the tiny model as owner/tiny (pass `models=`) that the processes started here talk to."""
    hub = FakeHub(**options)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    return hub


def download(timeout: float = 120) -> subprocess.CompletedProcess:
    """`download_model("owner/tiny")` in a process of its own; prints its (done, total) progress as JSON lines."""
    code = (
        "import json; from training.download import download_model\n"
        "folder = download_model('owner/tiny', on_progress=lambda d, t: print(json.dumps([d, t]), flush=True))\n"
        "print(json.dumps(str(folder)))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def weights_get(hub: FakeHub) -> int:
    return sum(1 for method, path in hub.requests if method == "GET" and path.endswith("/model.safetensors"))


def events_of(run_dir: str | Path) -> list[dict]:
    return read_events(Path(run_dir) / "events.jsonl")[0]


# ---------------------------------------------------------------- which files, and how progress reads


def test_only_the_files_that_loading_a_causal_lm_reads_are_fetched():
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json", "tokenizer.model", "merges.txt",
            "chat_template.jinja", "additional_chat_templates/tools.jinja", "model.gguf", "onnx/model.onnx",
            "onnx/config.json", "original/consolidated.00.pth", "training_args.bin", ".gitattributes", "README.md"]  # fmt: skip
    assert model_files(repo) == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                                        "tokenizer.model", "merges.txt", "chat_template.jinja",
                                        "additional_chat_templates/tools.jinja"])  # fmt: skip
    # a repo without safetensors: its PyTorch weights (never training_args.bin)
    assert model_files(["config.json", "pytorch_model.bin", "training_args.bin", "vocab.txt"]) == [
        "config.json", "pytorch_model.bin", "vocab.txt"
    ]  # fmt: skip


def test_download_events_say_bytes_rate_and_eta_and_end_with_a_durable_one():
    emitted: list[tuple[str, bool, dict]] = []
    report = DownloadEvents("owner/tiny", lambda kind, durable=False, **f: emitted.append((kind, durable, f)), every_s=3600)
    report(350 * MB, 988 * MB)  # resumed: 350 MB were kept from an interrupted download
    report(400 * MB, 988 * MB)  # within the interval: not sent
    report.every_s = 0
    report(450 * MB, 988 * MB)
    report(988 * MB, 988 * MB)
    assert [(kind, durable) for kind, durable, _ in emitted] == [("download", False)] * 2 + [("download", True)]
    first, during, last = (fields for _, _, fields in emitted)
    pace = re.fullmatch(r"downloading model owner/tiny: 450\.0 / 988\.0 MB \((\d+\.\d) MB/s, (\d+) s left\)", during["message"])
    assert pace and int(pace[2]) == during["eta_s"]
    assert during["rate_mb_s"] > 0 and during["eta_s"] >= 0
    assert first["message"] == "downloading model owner/tiny: 350.0 / 988.0 MB" and first["stage"] == "downloading model"
    assert (first["done_mb"], first["total_mb"], first["rate_mb_s"], first["eta_s"]) == (350.0, 988.0, 0.0, None)
    assert last["stage"] == "downloaded model" and last["done_bytes"] == last["total_bytes"] == 988 * MB
    assert last["message"].startswith("downloaded model owner/tiny: 988.0 MB in ") and last["eta_s"] is None
    assert last["rate_mb_s"] > 0  # of this session's 638 MB, not the kept 350


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_cli_draws_a_download_as_one_line_on_a_terminal_and_as_plain_lines_elsewhere():
    events = [{"event": "download", "model": "owner/tiny", "stage": "downloading model", "done_mb": 350.0, "total_mb": 988.0,
               "rate_mb_s": 23.5, "eta_s": 27},
              {"event": "download", "model": "owner/tiny", "stage": "downloaded model", "done_mb": 988.0, "total_mb": 988.0,
               "rate_mb_s": 23.5, "eta_s": None, "message": "downloaded model owner/tiny: 988.0 MB in 42 s"}]  # fmt: skip
    plain = io.StringIO()
    terminal = _Terminal()
    for event in events:
        StageLine(plain).show(event)
    line = StageLine(terminal)
    for event in events:
        line.show(event)
    assert plain.getvalue().splitlines() == [
        "downloading owner/tiny 350.0 / 988.0 MB, 23.5 MB/s, ETA 0:27",
        "downloaded model owner/tiny: 988.0 MB in 42 s (23.5 MB/s)",
    ]
    drawn = terminal.getvalue()
    assert drawn.startswith("\rdownloading owner/tiny [=========               ] 350.0 / 988.0 MB, 23.5 MB/s, ETA 0:27")
    assert drawn.count("\n") == 1 and drawn.endswith("\n")  # redrawn in place (blanking the longer line), one line in the end
    assert drawn.split("\r")[-1].rstrip() == "downloaded model owner/tiny: 988.0 MB in 42 s (23.5 MB/s)"


# ---------------------------------------------------------------- backprop train --model owner/tiny


@pytest.mark.slow
def test_a_hub_model_downloads_with_progress_and_the_next_run_takes_it_from_the_cache(home, hf_home, tiny_model_dir, monkeypatch):
    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    served = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    args = ("train", "--model", "owner/tiny", "--data", str(DEMO_DATA), "--steps", "2", "--json")
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}) as hub:
        first = backprop(*args)
        assert first.returncode == 0, first.stdout + first.stderr
        assert weights_get(hub) == 1
        hub.requests.clear()
        second = backprop(*args)
        assert second.returncode == 0, second.stdout + second.stderr
        assert weights_get(hub) == 0  # the weights came from the cache
    events = events_of(json.loads(first.stdout)["run_dir"])
    downloads = [e for e in events if e["event"] == "download"]
    started = next(i for i, e in enumerate(events) if e["event"] == "started")
    assert downloads and all(events.index(e) < started for e in downloads)  # before the training starts
    done = [e["done_bytes"] for e in downloads]
    assert done == sorted(done) and done[0] == 0 and done[-1] == downloads[-1]["total_bytes"]
    assert weights <= downloads[-1]["total_bytes"] <= served  # the weights and whichever small files the CLI had not fetched
    assert downloads[-1]["stage"] == "downloaded model" and downloads[-1]["message"].startswith("downloaded model owner/tiny")
    assert "downloading owner/tiny 0.0 / " in first.stderr and "downloaded model owner/tiny: " in first.stderr  # the CLI's lines
    assert not [e for e in events_of(json.loads(second.stdout)["run_dir"]) if e["event"] == "download"]
    assert not list(hf_home.glob(f"{CACHE}/blobs/*.incomplete"))


@pytest.mark.slow
def test_the_download_does_not_count_against_the_time_box(home, hf_home, tiny_model_dir, monkeypatch):
    """A time box of 60 microseconds, a download held up for longer: the run still trains its step, because the box
    starts at the first step."""
    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}, pause_at=("model.safetensors", weights // 2)) as hub:
        out = backprop("train", "--model", "owner/tiny", "--data", str(DEMO_DATA), "--steps", "1", "--max-run-minutes", "1e-6",
                       "--detach", "--json", check=True)  # fmt: skip
        run = Registry(home).get(json.loads(out.stdout)["run_id"])
        assert hub.paused.wait(timeout=180), "the download never reached the pause"
        wait_for(lambda: any(e["event"] == "download" for e in events_of(run.path)), what="a download event")
        time.sleep(0.1)  # hold the download well past the time box
        hub.resume.set()
        ended = wait_for(lambda: (r := Registry(home).get(run.id)).status not in ACTIVE and r, what="the run's end")
    assert (ended.status, ended.step) == ("completed", 1), ended.error_message
    events = events_of(run.path)
    downloads = [e for e in events if e["event"] == "download"]
    assert downloads[-1]["t"] - downloads[0]["t"] >= 0.1 - 0.002  # the download lasted longer than the box
    clock = next(e for e in events if e.get("message", "").startswith("time box:"))
    assert events.index(clock) > events.index(downloads[-1])  # the box started after the download


# ---------------------------------------------------------------- resuming, and without the hub


def test_a_killed_download_resumes_from_the_bytes_it_kept(hf_home, tiny_model_dir, monkeypatch):
    original = (tiny_model_dir / "model.safetensors").read_bytes()
    code = "from training.download import download_model; download_model('owner/tiny')"
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}, pause_at=("model.safetensors", len(original) - 1000)) as hub:
        process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE)
        try:
            assert hub.paused.wait(timeout=120), "the download never reached the pause"
            # the weights' own partial blob: the small files download beside it and may be half-written too
            partial = hf_home / CACHE / "blobs" / f"{hashlib.sha256(original).hexdigest()}.incomplete"
            wait_for(lambda: partial.exists() and partial.stat().st_size, what="bytes written to the partial blob")
            others = len(list(tiny_model_dir.iterdir())) - 1  # whole before the kill: a resume continues only the weights
            wait_for(lambda: len([p for p in partial.parent.iterdir() if p.suffix != ".incomplete"]) == others,
                     what="the other files fetched whole")  # fmt: skip
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the whole process group, as a closed terminal or a crash would
            process.wait(timeout=60)
            process.stderr.close()
        kept = partial.stat().st_size
        assert 0 < kept < len(original)
        hub.pause_at = None
        hub.resume.set()
        hub.ranges.clear()
        again = download()
    assert again.returncode == 0, again.stderr
    progress = [json.loads(line) for line in again.stdout.splitlines()[:-1]]
    assert progress[0][0] >= kept and progress[-1][0] == progress[-1][1]  # the progress starts at what was kept
    assert [r for _, r in hub.ranges] == [f"bytes={kept}-"]  # only the rest was asked for
    snapshot = Path(json.loads(again.stdout.splitlines()[-1]))
    assert (snapshot / "model.safetensors").read_bytes() == original
    assert not list(hf_home.glob(f"{CACHE}/blobs/*.incomplete"))


def test_a_dropped_connection_continues_where_it_broke(hf_home, tiny_model_dir, monkeypatch):
    original = (tiny_model_dir / "model.safetensors").read_bytes()
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}, drop_at=("model.safetensors", len(original) - 1000)) as hub:
        result = download()
    assert result.returncode == 0, result.stderr
    (path, asked), *_ = hub.ranges
    assert path.endswith("/model.safetensors") and 0 < int(asked.removeprefix("bytes=").rstrip("-")) < len(original)
    assert (Path(json.loads(result.stdout.splitlines()[-1])) / "model.safetensors").read_bytes() == original


def test_a_downloaded_model_loads_without_the_hub(hf_home, tiny_model_dir, monkeypatch):
    """Once cached, the model loads offline (HF_HUB_OFFLINE=1) and when the hub cannot be reached (the closed port)."""
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}):
        assert download().returncode == 0
    load = (
        "from training.download import download_model; from training.models import ModelSource, load_model, load_tokenizer\n"
        "source = ModelSource('owner/tiny', 'owner/tiny', False)\n"
        "print(download_model('owner/tiny').name, type(load_model(source, tokenizer=load_tokenizer(source))).__name__)"
    )
    for hub_env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        env = {**os.environ, **hub_env}
        out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0 and out.stdout.split() == [COMMIT, "LlamaForCausalLM"], (hub_env, out.stderr)
        assert "Retrying" not in out.stderr  # nothing waited on the hub that is not there


def test_counting_tokens_fetches_the_tokenizer_not_the_weights(home, hf_home, tiny_model_dir, monkeypatch):
    with serve(monkeypatch, models={"owner/tiny": tiny_model_dir}) as hub:
        out = backprop("validate", str(DEMO_DATA), "--model", "owner/tiny", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokenizer"] == "owner/tiny"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hub.downloads())
    assert "model.safetensors" not in hub.downloads()


@pytest.mark.parametrize(("offline", "plan"), [("0", "--plan"), ("0", "--no-plan"), ("1", "--plan")],
                         ids=["hub-unreachable", "hub-unreachable-in-the-worker", "HF_HUB_OFFLINE"])  # fmt: skip
def test_an_uncached_hub_model_without_the_hub_fails_with_a_coded_error(home, hf_home, offline, plan):
    # conftest's HF_ENDPOINT is a closed loopback port; the subprocess timeout only guards against retry loops.
    args = ("train", "--model", "owner/tiny", "--data", str(DEMO_DATA), "--steps", "1", *([plan] if plan == "--no-plan" else []))
    out = backprop(*args, env={"HF_HUB_OFFLINE": offline}, timeout=120)
    assert out.returncode == 2 and "[DEP_MODEL_LOAD_FAILED]" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "owner/tiny" in out.stdout + out.stderr


# ---------------------------------------------------------------- backprop train --data owner/name


def capitals(tmp_path: Path) -> tuple[Path, list[list[dict]], list[dict]]:
    """owner/capitals, laid out as on the hub: a train split in three parquet shards and a validation split of one;
    (its folder, the train shards' rows, the validation rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "served" / "capitals"  # not ./owner/capitals: the datasets library would read that folder instead
    (repo / "data").mkdir(parents=True)
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    shards = [rows[0:5], rows[5:11], rows[11:18]]
    for i, shard in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(shard), repo / "data" / f"train-{i:05d}-of-00003.parquet")
    held_out = rows[18:21]
    pq.write_table(pa.Table.from_pylist(held_out), repo / "data" / "validation-00000-of-00001.parquet")
    return repo, shards, held_out


def data_gets(hub: FakeHub) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and path.endswith(".parquet")]


@pytest.mark.slow
def test_training_on_a_sharded_hub_dataset_reads_every_shard_and_evaluates_on_its_validation_split(home, hf_home, tmp_path,
                                                                                                  monkeypatch):  # fmt: skip
    repo, shards, held_out = capitals(tmp_path)
    with serve(monkeypatch, repos={"owner/capitals": repo}) as hub:
        out = backprop("train", "--model", "demo", "--data", "owner/capitals", "--steps", "2", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        evaluated = backprop("eval", json.loads(out.stdout)["run_id"], "--json")
    assert {f"data/train-{i:05d}-of-00003.parquet" for i in range(3)} <= set(hub.downloads())
    assert len(data_gets(hub)) == 4  # the plan fetched each data file once; the worker found them cached
    # The plan measures the data in this process: its download line is this command's, before the run exists.
    assert "downloading owner/capitals 0.0 / " in out.stderr and "downloaded dataset owner/capitals: " in out.stderr
    run_dir = json.loads(out.stdout)["run_dir"]
    assert json.loads((Path(run_dir) / "spec.json").read_text())["plan"]["data"]["examples"] == sum(map(len, shards))
    events = events_of(run_dir)
    assert not [e for e in events if e["event"] == "download"]
    started = next(e for e in events if e["event"] == "started")
    assert started["dataset"] == "owner/capitals@train"
    assert (started["examples"], started["validation_examples"]) == (sum(map(len, shards)), len(held_out))
    assert [e["event"] for e in events if e["event"] == "eval"] == ["eval"]  # the held-out split scored at the end
    # `backprop eval` measures base against tuned on the same held-out split
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads(evaluated.stdout)["data"]["examples"] == len(held_out)


@pytest.mark.slow
def test_a_hub_dataset_downloads_with_progress_events_and_the_next_run_takes_it_from_the_cache(home, hf_home, tmp_path,
                                                                                               monkeypatch):  # fmt: skip
    repo, _, _ = capitals(tmp_path)
    # Loading the train split prepares every split of the config: its data files are what downloads.
    data_bytes = sum(p.stat().st_size for p in (repo / "data").iterdir())
    # --no-plan: the plan would read the data in the CLI first (the worker would then find it cached)
    args = ("train", "--model", "demo", "--data", "owner/capitals", "--steps", "1", "--no-plan", "--json")
    with serve(monkeypatch, repos={"owner/capitals": repo}) as hub:
        first = backprop(*args)
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(data_gets(hub)) == 4  # each data file once: the loader found them in the cache
        hub.requests.clear()
        second = backprop(*args)
        assert second.returncode == 0, second.stdout + second.stderr
        assert data_gets(hub) == []
    events = events_of(json.loads(first.stdout)["run_dir"])
    downloads = [e for e in events if e["event"] == "download"]
    started = next(i for i, e in enumerate(events) if e["event"] == "started")
    assert downloads and all(events.index(e) < started for e in downloads)
    assert {e["dataset"] for e in downloads} == {"owner/capitals"} and "model" not in downloads[0]
    done = [e["done_bytes"] for e in downloads]
    assert done == sorted(done) and done[0] == 0 and done[-1] == downloads[-1]["total_bytes"] == data_bytes
    assert downloads[0]["stage"] == "downloading dataset" and downloads[-1]["stage"] == "downloaded dataset"
    assert downloads[-1]["message"].startswith("downloaded dataset owner/capitals: ")
    assert "downloading owner/capitals 0.0 / " in first.stderr and "downloaded dataset owner/capitals: " in first.stderr
    assert not [e for e in events_of(json.loads(second.stdout)["run_dir"]) if e["event"] == "download"]


def test_a_killed_dataset_download_resumes_from_the_bytes_it_kept(hf_home, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo, _, _ = capitals(tmp_path)
    shard = "data/train-00001-of-00003.parquet"
    # over the 10 MB that the hub client reads at a time: bytes before the pause reach the disk
    pq.write_table(pa.Table.from_pylist([{"text": os.urandom(6 * MB).hex()}]), repo / shard, compression="none")
    original = (repo / shard).read_bytes()
    fetch = (
        "import json; from training.datasets import fetch_hub_dataset\n"
        "print(fetch_hub_dataset('owner/capitals', on_progress=lambda d, t: print(json.dumps([d, t]), flush=True)))"
    )
    with serve(monkeypatch, repos={"owner/capitals": repo}, pause_at=(shard, len(original) - 1000)) as hub:
        process = subprocess.Popen([sys.executable, "-c", fetch], start_new_session=True, stderr=subprocess.PIPE)
        try:
            assert hub.paused.wait(timeout=120), "the download never reached the pause"
            blobs = "hub/datasets--owner--capitals/blobs"
            partial = hf_home / blobs / f"{hashlib.sha256(original).hexdigest()}.incomplete"  # the shard's, not another's
            wait_for(lambda: partial.exists() and partial.stat().st_size, what="bytes written to the partial blob")
            wait_for(lambda: len([p for p in hf_home.glob(f"{blobs}/*") if p.suffix != ".incomplete"]) == 3,
                     what="the other data files fetched whole")  # fmt: skip
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            process.stderr.close()
        kept = partial.stat().st_size
        hub.pause_at = None
        hub.resume.set()
        hub.ranges.clear()
        hub.requests.clear()
        again = subprocess.run([sys.executable, "-c", fetch], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "True", again.stderr
    assert 0 < kept < len(original)
    progress = [json.loads(line) for line in again.stdout.splitlines()[:-1]]
    assert progress[0][0] >= kept and progress[-1][0] == progress[-1][1]
    assert [(path.rsplit("/", 1)[-1], asked) for path, asked in hub.ranges] == [(shard.rsplit("/", 1)[-1], f"bytes={kept}-")]
    assert [p.rsplit("/", 1)[-1] for p in data_gets(hub)] == [shard.rsplit("/", 1)[-1]]  # the others were kept whole
    assert (hf_home / "hub/datasets--owner--capitals/snapshots" / COMMIT / shard).read_bytes() == original
    assert not list(hf_home.glob(f"{blobs}/*.incomplete"))
