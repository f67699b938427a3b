"""The run registry: SQLite shared by many processes; ids by prefix; dead workers found out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training.errors import BackpropError
from training.runs import Registry

WRITER = """
import sys
from training.runs import Registry
registry = Registry(sys.argv[1])
for i in range(25):
    run = registry.create("train", {"params": {"writer": sys.argv[2], "i": i}}, model="demo")
    registry.update(run.id, status="running", step=i, loss=1.0 / (i + 1))
    registry.add_checkpoint(run.id, i, run.path / "ckpt")
    registry.update(run.id, status="completed")
"""


def test_eight_processes_writing_at_once_lose_no_row(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w)]) for w in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    registry = Registry(tmp_path)
    runs = registry.list()
    assert len(runs) == 200
    assert {(r.params["writer"], r.params["i"]) for r in runs} == {(str(w), i) for w in range(8) for i in range(25)}
    assert all(r.status == "completed" for r in runs)
    assert all(len(registry.checkpoints(r.id)) == 1 for r in runs)
    import sqlite3

    assert sqlite3.connect(registry.db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_runs_are_found_by_unambiguous_prefix(tmp_path):
    registry = Registry(tmp_path)
    runs = [registry.create("train", {}) for _ in range(40)]
    target = runs[0]
    assert registry.get(target.id[:8]).id == target.id
    assert (target.path / "spec.json").exists()
    with pytest.raises(BackpropError) as caught:
        registry.get("")  # matches every run
    assert caught.value.code == "INPUT_RUN_AMBIGUOUS"
    with pytest.raises(BackpropError) as caught:
        registry.get("zzzz")
    assert caught.value.code == "INPUT_RUN_NOT_FOUND" and caught.value.exit_code == 1


def test_a_running_run_whose_process_died_is_marked_interrupted(tmp_path):
    registry = Registry(tmp_path)
    run = registry.create("train", {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.update(run.id, status="running", pid=dead.pid)
    alive = registry.create("train", {})
    registry.update(alive.id, status="running", pid=subprocess.os.getpid())

    assert registry.get(run.id).status == "interrupted"
    assert registry.get(alive.id).status == "running"
    assert [r.id for r in registry.list(status="interrupted")] == [run.id]
