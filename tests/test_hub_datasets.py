"""Hub datasets load whole through the `datasets` library: every shard of the split, configs, splits, slices, streaming.

Tests stay offline: the dataset repository is built on disk, laid out as on the hub (parquet shards under data/, configs
in the README's YAML). It is served two ways: by a stand-in hub on 127.0.0.1 (tests/fake_hub.py; the real download
path: repo API, tree listing, file downloads into the HF cache, then offline from that cache), and as a folder named
like its id in the working directory, which `datasets.load_dataset("owner/name")` reads before asking the hub (the
same code in Backprop, and fast enough for the many small cases).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import backprop, write_lines
from fake_hub import FakeHub

from training.datasets import HubDataset, load_dataset, parse_hub_id, resolve_path, scan
from training.errors import BackpropError

SHARD_ROWS = (4, 5, 6)  # three train shards of different sizes
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train-*
---
# An agent dataset
"""


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """owner/agent-set: a train split in three parquet shards, a test split, and a second config of two shards."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")  # never the user's cache
    root = tmp_path / "owner" / "agent-set"
    (root / "data").mkdir(parents=True)
    (root / "alpaca").mkdir()
    (root / "README.md").write_text(README)
    for shard, rows in enumerate(SHARD_ROWS):
        name = f"train-{shard:05d}-of-{len(SHARD_ROWS):05d}.parquet"
        parquet(root / "data" / name, [{"prompt": f"q{shard}.{i}", "completion": f"a{shard}.{i}"} for i in range(rows)])
    parquet(root / "data" / "test-00000-of-00001.parquet", [{"prompt": "held out", "completion": "yes"}])
    for shard in range(2):
        rows = [{"instruction": f"i{shard}.{i}", "output": f"o{shard}.{i}"} for i in range(3)]
        parquet(root / "alpaca" / f"train-{shard:05d}-of-00002.parquet", rows)
    return root


def parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_hub_ids_name_a_config_and_a_split():
    assert parse_hub_id("owner/name") == HubDataset("owner/name", None, "train")
    assert parse_hub_id("owner/name:chat") == HubDataset("owner/name", "chat", "train")
    assert parse_hub_id("owner/name@test") == HubDataset("owner/name", None, "test")
    assert parse_hub_id("owner/name:chat@train[:1000]") == HubDataset("owner/name", "chat", "train[:1000]")
    assert parse_hub_id("data/train.jsonl") is None  # a missing file stays a missing file
    with pytest.raises(BackpropError) as caught:
        resolve_path("data/train.jsonl")
    assert caught.value.code == "INPUT_DATASET_NOT_FOUND"


def test_every_shard_of_the_split_is_loaded(repo):
    dataset = load_dataset("owner/agent-set")
    assert len(dataset.examples) == sum(SHARD_ROWS)  # before: the first file only
    prompts = {e.messages[0]["content"] for e in dataset.examples}
    assert prompts == {f"q{shard}.{i}" for shard, rows in enumerate(SHARD_ROWS) for i in range(rows)}
    assert [e.line for e in dataset.examples] == list(range(1, sum(SHARD_ROWS) + 1))  # row numbers across the split
    assert dataset.report.file_type == "hub" and dataset.report.format == "prompt_completion"
    assert dataset.report.path.endswith("owner/agent-set@train")
    assert len(dataset.sha256) == 64 and load_dataset("owner/agent-set").sha256 == dataset.sha256


def test_configs_splits_slices_and_streaming(repo):
    alpaca = load_dataset("owner/agent-set:alpaca")
    assert len(alpaca.examples) == 6 and alpaca.report.format == "alpaca"  # two parquet shards of 3
    assert {e.messages[0]["content"] for e in alpaca.examples} == {f"i{s}.{i}" for s in range(2) for i in range(3)}
    assert [e.messages[0]["content"] for e in load_dataset("owner/agent-set@test").examples] == ["held out"]
    assert len(load_dataset("owner/agent-set@train[:5]").examples) == 5

    streamed = load_dataset("owner/agent-set", streaming=True)
    whole = load_dataset("owner/agent-set")
    assert [e.messages for e in streamed.examples] == [e.messages for e in whole.examples]
    assert streamed.sha256 == whole.sha256  # the rows' hash, however they were read
    window = load_dataset("owner/agent-set@train[3:7]", streaming=True)
    assert [e.messages for e in window.examples] == [e.messages for e in whole.examples[3:7]]


@pytest.mark.parametrize(
    ("source", "words"),
    [("owner/agent-set:nope", "BuilderConfig 'nope' not found"), ("owner/agent-set@validation", 'Unknown split "validation"')],
)
def test_an_unknown_config_or_split_is_a_coded_error_naming_the_choices(repo, source, words):
    with pytest.raises(BackpropError) as caught:
        load_dataset(source)
    assert caught.value.code == "INPUT_DATASET_HUB_SELECTION" and caught.value.exit_code == 1
    assert words in caught.value.message and "owner/name:config" in caught.value.hint


def test_a_bad_row_in_a_later_shard_names_its_row_in_the_split(repo):
    # a missing answer: the shard's schema gives the row "completion": null
    parquet(repo / "data" / "train-00001-of-00003.parquet", [{"prompt": "fine", "completion": "ok"}, {"prompt": "no answer"}])
    report = scan("owner/agent-set")
    bad_row = SHARD_ROWS[0] + 2
    assert report.rows == SHARD_ROWS[0] + 2 + SHARD_ROWS[2]
    assert [(e.line, e.code) for e in report.errors] == [(bad_row, "INPUT_DATASET_INVALID_ROW")]
    with pytest.raises(BackpropError, match=rf"owner/agent-set@train:{bad_row}: 'completion' must be a string, got null"):
        load_dataset("owner/agent-set")


def test_tool_call_rows_from_a_sharded_jsonl_dataset_survive_the_librarys_schema_merging(repo):
    """JSON lines shards this time; the library merges every row's keys into one schema (a user turn gets
    "tool_calls": null, ...), which must not break the rows."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 5}'},
            {"role": "assistant", "content": "5 degrees."},
        ]
    }
    root = repo.parent / "agent-jsonl"
    (root / "data").mkdir(parents=True)
    for shard in range(2):
        write_lines(root / "data" / f"train-{shard:05d}-of-00002.jsonl", [json.dumps(row)] * (shard + 2))
    dataset = load_dataset("owner/agent-jsonl")
    assert len(dataset.examples) == 5
    assert dataset.examples[0].messages == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "c1"},
        ]},
        {"role": "tool", "content": '{"temp_c": 5}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "5 degrees."},
    ]  # fmt: skip


def test_an_uncached_hub_id_offline_fails_at_once_with_a_coded_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackpropError) as caught:
        load_dataset("someone/not-cached:chat@train")
    assert caught.value.code == "DEP_DATASET_DOWNLOAD_FAILED" and caught.value.exit_code == 2
    assert "someone/not-cached:chat@train" in caught.value.message and "offline (HF_HUB_OFFLINE)" in caught.value.message


def test_backprop_validate_reads_every_shard_of_a_hub_dataset(repo, tmp_path):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache")}
    result = backprop("validate", "owner/agent-set:alpaca@train", "--no-tokens", "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["file_type"], report["rows"], report["valid_rows"], report["format"]) == ("hub", 6, 6, "alpaca")
    streamed = backprop("validate", "owner/agent-set:alpaca@train", "--no-tokens", "--json", "--streaming", env=env)
    assert streamed.returncode == 0 and json.loads(streamed.stdout)["rows"] == 6, streamed.stderr

    offline = backprop("validate", "someone/not-cached", "--no-tokens", env=env)
    assert offline.returncode == 2 and "[DEP_DATASET_DOWNLOAD_FAILED]" in offline.stdout + offline.stderr


# ---------------------------------------------------------------- through a stand-in hub on 127.0.0.1


@pytest.fixture
def hub(repo, tmp_path, monkeypatch):
    """The repository served by a stand-in hub; the working directory moves away from the folder of the same name, and
    the subprocesses started here (the CLI, training workers) talk to the stand-in with an HF cache of their own."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with FakeHub({"owner/agent-set": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield fake


def test_a_hub_id_downloads_every_shard_then_loads_offline_from_the_cache(hub, tmp_path):
    online = backprop("validate", "owner/agent-set", "--no-tokens", "--json")
    assert online.returncode == 0, online.stdout + online.stderr
    report = json.loads(online.stdout)
    assert (report["file_type"], report["rows"], report["valid_rows"]) == ("hub", sum(SHARD_ROWS), sum(SHARD_ROWS))
    train_shards = [f"data/train-{i:05d}-of-00003.parquet" for i in range(len(SHARD_ROWS))]
    assert set(train_shards) <= set(hub.downloads())  # before: one file trained on

    asked = len(hub.requests)
    offline = backprop("validate", "owner/agent-set", "--no-tokens", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert json.loads(offline.stdout)["rows"] == sum(SHARD_ROWS) and len(hub.requests) == asked  # from the cache only

    fresh = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    uncached = backprop("validate", "owner/agent-set", "--no-tokens", env=fresh)
    assert uncached.returncode == 2 and "[DEP_DATASET_DOWNLOAD_FAILED]" in uncached.stdout + uncached.stderr
    assert "not in the local cache" in uncached.stdout + uncached.stderr and len(hub.requests) == asked


def test_a_streamed_hub_split_reads_every_shard_without_preparing_it_on_disk(hub, tmp_path):
    import subprocess
    import sys

    def rows_and_hash(streaming: bool) -> tuple[int, str]:
        probe = f"from training.datasets import scan; r = scan('owner/agent-set', streaming={streaming}); print(r.rows, r.sha256)"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        rows, sha256 = out.stdout.split()
        return int(rows), sha256

    prepared = tmp_path / "hf-home" / "datasets" / "owner___agent-set"
    streamed = rows_and_hash(streaming=True)
    assert streamed[0] == sum(SHARD_ROWS) and not prepared.exists()
    assert rows_and_hash(streaming=False) == streamed and prepared.exists()  # the same rows, hashed the same


@pytest.mark.slow
def test_training_on_a_hub_dataset_uses_every_shard(home, hub):
    from training import Trainer
    from training.events import read_events

    result = Trainer("demo").train("owner/agent-set", steps=3)
    assert result.status == "completed" and result.steps == 3
    events, _ = read_events(Path(result.run_dir) / "events.jsonl")
    started = next(e for e in events if e["event"] == "started")
    assert started["examples"] + started["validation_examples"] == sum(SHARD_ROWS)
    assert started["dataset"] == "owner/agent-set@train"
