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


# The schema as the first releases created it (before the queue columns, exports and the forgetting matrix), with
# no user_version: registries in the field look like this.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, kind TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, ended_at REAL, model TEXT, dataset TEXT, dataset_sha256 TEXT, params TEXT NOT NULL DEFAULT '{}',
    run_dir TEXT NOT NULL, parent_id TEXT, pid INTEGER, heartbeat REAL, step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER, loss REAL, final_loss REAL, eval_loss REAL, error_code TEXT, error_message TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, step INTEGER NOT NULL, path TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (run_id, step)
);
"""


def columns(db_path) -> dict[str, list[tuple[str, str]]]:
    import sqlite3

    db = sqlite3.connect(db_path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: sorted((r[1], r[2]) for r in db.execute(f"PRAGMA table_info({t})")) for t in tables}


def test_a_registry_of_the_first_schema_migrates_in_order_and_keeps_its_rows(tmp_path):
    import sqlite3

    from training.runs import SCHEMA_VERSION

    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "runs.db")
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO runs (id, kind, status, created_at, model, params, run_dir, step, final_loss)"
        " VALUES ('a1b2c3', 'train', 'completed', 1.0, 'demo', '{\"lr\": 0.001}', ?, 40, 0.25)",
        (str(old / "runs" / "a1b2c3"),),
    )
    db.execute("INSERT INTO checkpoints VALUES ('a1b2c3', 40, '/x/step-000040', 2.0)")
    db.commit()
    db.close()

    registry = Registry(old)
    version = sqlite3.connect(registry.db_path).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION
    assert columns(registry.db_path) == columns(Registry(tmp_path / "new").db_path)  # the same as a new registry
    run = registry.get("a1b2c3")
    assert (run.status, run.model, run.step, run.final_loss, run.params) == ("completed", "demo", 40, 0.25, {"lr": 0.001})
    assert run.reason is None and run.queued_at is None and run.gpu_index is None
    assert [c.step for c in registry.checkpoints("a1b2c3")] == [40]
    registry.record_forgetting("a1b2c3", 1, [0.5])  # the tables of later migrations work
    assert registry.forgetting("a1b2c3") == [[0.5]]
    assert registry.exports("a1b2c3") == []
    assert Registry(old).get("a1b2c3").final_loss == 0.25  # opening it again changes nothing


def test_migrations_apply_only_the_missing_steps_in_order(tmp_path, monkeypatch):
    """A registry at version 2 (runs with the queue columns) gets migrations 3 and 4, not 1 and 2 again."""
    import sqlite3

    from training import runs

    fresh = Registry(tmp_path / "a")
    db = sqlite3.connect(fresh.db_path)
    db.executescript("DROP TABLE exports; DROP TABLE forgetting; PRAGMA user_version = 2;")
    db.close()
    applied: list[int] = []

    def recorded(number: int, migration):
        return lambda db: (applied.append(number), migration(db))[-1]

    monkeypatch.setattr(runs, "MIGRATIONS", [recorded(i, m) for i, m in enumerate(runs.MIGRATIONS, 1)])
    Registry(tmp_path / "a")
    assert applied == list(range(3, runs.SCHEMA_VERSION + 1))
    assert columns(fresh.db_path) == columns(Registry(tmp_path / "b").db_path)


def test_a_registry_newer_than_this_code_is_a_coded_error(tmp_path):
    import sqlite3

    from training.runs import SCHEMA_VERSION

    registry = Registry(tmp_path)
    registry.create("train", {})
    db = sqlite3.connect(registry.db_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(BackpropError) as caught:
        Registry(tmp_path)
    assert caught.value.code == "STATE_REGISTRY_TOO_NEW" and str(SCHEMA_VERSION + 1) in caught.value.message
    assert caught.value.hint and caught.value.exit_code == 2


def test_a_registry_from_before_the_one_name_for_multi_runs_keeps_its_multi_runs(tmp_path):
    """Version 4 called a multi-run 'multirun' (its kind) and 'campaign' (the forgetting matrix's column)."""
    import sqlite3

    from training.runs import MIGRATIONS

    home = tmp_path / "v4"
    home.mkdir()
    db = sqlite3.connect(home / "runs.db")
    for migration in MIGRATIONS[:4]:
        migration(db)
    db.execute("INSERT INTO runs (id, kind, status, created_at, run_dir) VALUES ('m1', 'multirun', 'completed', 1.0, ?)",
               (str(home / "runs" / "m1"),))  # fmt: skip
    db.execute("INSERT INTO forgetting (campaign_id, after_run, task, eval_loss) VALUES ('m1', 1, 1, 0.5)")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()

    registry = Registry(home)
    assert registry.get("m1").kind == "multi-run" and registry.list(kind="multi-run")[0].id == "m1"
    assert registry.forgetting("m1") == [[0.5]]
