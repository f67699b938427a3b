"""The run registry: one SQLite database (WAL) shared by the CLI, workers and the web app.

    <home>/runs.db              runs and their checkpoints
    <home>/runs/<id>/           spec.json, events.jsonl, train.log, checkpoints/, adapter/

Every write is one short IMMEDIATE transaction, so several processes can write at once without losing a
row. A run whose worker died without a last word (status running or paused, pid gone) is marked
`interrupted` by whoever looks at it next.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from training import atomic
from training.errors import BackpropError

ACTIVE = ("queued", "running", "paused")
RESUMABLE = ("interrupted", "timeboxed", "stopped", "failed")
STATUSES = (*ACTIVE, "completed", *RESUMABLE)
RUN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
STALE_HEARTBEAT_S = 120  # workers beat every few seconds; this much silence means the worker is gone

# The schema is built by ordered migrations; PRAGMA user_version holds how many have been applied. A registry
# written before versioning (user_version 0) may be at any of the first states, so those steps tolerate
# what is already there. Add a migration at the end; never edit one that has shipped.
_BASE_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    model TEXT,
    dataset TEXT,
    dataset_sha256 TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    run_dir TEXT NOT NULL,
    parent_id TEXT,
    pid INTEGER,
    heartbeat REAL,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER,
    loss REAL,
    final_loss REAL,
    eval_loss REAL,
    error_code TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
"""
_EXPORTS_TABLE = """
CREATE TABLE IF NOT EXISTS exports (
    id TEXT PRIMARY KEY,
    run_id TEXT,
    format TEXT NOT NULL,
    quantization TEXT,
    path TEXT NOT NULL,
    file TEXT,
    size_bytes INTEGER NOT NULL,
    verification TEXT,
    ollama TEXT,
    created_at REAL NOT NULL
);
"""
_FORGETTING_TABLE = """
CREATE TABLE IF NOT EXISTS forgetting (
    campaign_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    after_run INTEGER NOT NULL,
    task INTEGER NOT NULL,
    eval_loss REAL NOT NULL,
    PRIMARY KEY (campaign_id, after_run, task)
);
"""
_ONE_NAME_FOR_MULTI_RUNS = """
UPDATE runs SET kind = 'multi-run' WHERE kind = 'multirun';
ALTER TABLE forgetting RENAME COLUMN campaign_id TO multi_run_id;
"""
_EVALUATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS evaluations (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    report TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_run ON evaluations(run_id, created_at);
"""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for column, sql_type in columns.items():
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


def _create(script: str) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        for statement in _statements(script):
            db.execute(statement)

    return apply


# Migration i (1-based) brings a registry from user_version i-1 to i.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _create(_BASE_TABLES),  # 1: runs and their checkpoints
    lambda db: _add_columns(db, "runs", {"reason": "TEXT", "queued_at": "REAL", "gpu_index": "INTEGER"}),  # 2: the queue
    _create(_EXPORTS_TABLE),  # 3: exports
    _create(_FORGETTING_TABLE),  # 4: the forgetting matrix of multi-runs
    _create(_ONE_NAME_FOR_MULTI_RUNS),  # 5: "campaign"/"multirun" became "multi-run" everywhere
    lambda db: _add_columns(db, "runs", {"gpus": "TEXT"}),  # 6: every GPU a job holds ("0,2"), for GPU-counted slots
    _create(_EVALUATIONS_TABLE),  # 7: did-it-help reports (base vs tuned), one JSON report a row
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class RunRecord:
    id: str
    name: str | None
    kind: str
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    model: str | None
    dataset: str | None
    dataset_sha256: str | None
    params: dict[str, Any]
    run_dir: str
    parent_id: str | None
    pid: int | None
    heartbeat: float | None
    step: int
    max_steps: int | None
    loss: float | None
    final_loss: float | None
    eval_loss: float | None
    error_code: str | None
    error_message: str | None
    reason: str | None  # why it is queued or paused
    queued_at: float | None
    gpu_index: int | None  # the job's first GPU
    gpus: str | None = None  # every GPU it holds, "0,2" (one maxParallel slot each)

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = [f.name for f in fields(RunRecord)]


@dataclass
class Checkpoint:
    run_id: str
    step: int
    path: str
    created_at: float


WAL_SWITCH_WAIT_S = 60


def _use_wal(db: sqlite3.Connection) -> None:
    """Put a registry file in WAL mode (it stays so). The switch needs the file to itself, and when processes that open a
    new registry together would deadlock over it, SQLite answers "database is locked" at once instead of waiting out
    the busy timeout: retry then, briefly (seen with eight processes creating one registry on a loaded machine)."""
    deadline = time.monotonic() + WAL_SWITCH_WAIT_S
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Registry:
    def __init__(self, home: Path):
        self.home = Path(home).expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "runs.db"
        with self._connect() as db:
            _use_wal(db)
            if self._version(db) != SCHEMA_VERSION:
                self._migrate()

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        return db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        """Apply the missing migrations in order, all in one transaction (several processes may open the registry
        at once: the first migrates, the others then find it current); a registry newer than this code is refused."""
        with self._write() as db:
            version = self._version(db)
            if version > SCHEMA_VERSION:
                raise BackpropError("STATE_REGISTRY_TOO_NEW", path=self.db_path, version=version, supported=SCHEMA_VERSION)
            for migration in MIGRATIONS[version:]:
                migration(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise BackpropError("STATE_REGISTRY_CORRUPT", path=self.db_path, reason=exc) from exc
        try:
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, no fsync per commit
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            raise BackpropError("STATE_REGISTRY_CORRUPT", path=self.db_path, reason=exc) from exc
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------ runs

    def create(
        self,
        kind: str,
        spec: dict[str, Any],
        *,
        model: str | None = None,
        dataset: str | None = None,
        name: str | None = None,
        parent_id: str | None = None,
        run_id: str | None = None,
        runs_root: Path | None = None,
    ) -> RunRecord:
        """A new queued run; its folder is `<runs_root or home/runs>/<id>` (the web app keeps its runs in its sandbox)."""
        if run_id is not None and not RUN_ID_PATTERN.fullmatch(run_id):
            raise BackpropError(
                "INPUT_INVALID_ARGUMENT",
                reason=f"invalid run id {run_id!r}",
                hint="Use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit.",
            )
        run_id = run_id or uuid.uuid4().hex[:12]
        now = time.time()
        run_dir = Path(runs_root or self.home / "runs") / run_id
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"run id {run_id!r} is taken",
                                hint="Choose another --run-id, or resume that run.") from None  # fmt: skip
        atomic.write_json(run_dir / "spec.json", {"id": run_id, "kind": kind, "home": str(self.home), **spec})
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, name, kind, status, created_at, queued_at, model, dataset, params, run_dir, parent_id)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, kind, now, now, model, dataset, json.dumps(spec.get("params", {})), str(run_dir), parent_id),
            )
        return self.get(run_id)

    def update(self, run_id: str, **values: Any) -> None:
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns: {unknown}")
        if "params" in values:
            values["params"] = json.dumps(values["params"])
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._write() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run_id))

    def get(self, id_or_prefix: str) -> RunRecord:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs WHERE id LIKE ? LIMIT 6", (id_or_prefix.lower() + "%",)).fetchall()
        exact = [r for r in rows if r["id"] == id_or_prefix]
        if exact:
            rows = exact
        if not rows:
            raise BackpropError("INPUT_RUN_NOT_FOUND", run_id=id_or_prefix)
        if len(rows) > 1:
            raise BackpropError("INPUT_RUN_AMBIGUOUS", run_id=id_or_prefix, matches=", ".join(r["id"] for r in rows))
        return self._refresh(self._record(rows[0]))

    def list(self, status: str | None = None, limit: int | None = None, kind: str | None = None) -> list[RunRecord]:
        query, args = "SELECT * FROM runs", []
        where = []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_at DESC"
        with self._connect() as db:
            records = [self._refresh(self._record(r)) for r in db.execute(query, args).fetchall()]
        if status:
            records = [r for r in records if r.status == status]
        return records[:limit] if limit else records

    def claim(self, run_id: str, max_parallel: int, dry_run: bool = False, gpus: list[int] | None = None) -> str | None:
        """Move a queued run to `running` if a slot is free and no run queued before it still waits.

        A job takes one maxParallel slot per GPU it holds (`gpus`, recorded with the claim), one on a CPU machine;
        a job that needs more slots than maxParallel runs alone. One IMMEDIATE transaction, so two workers can
        never both take the last slot. Returns None when claimed (or, with `dry_run`, claimable), else why not."""
        slots = max(1, len(gpus or []))
        with self._write() as db:
            me = db.execute("SELECT queued_at FROM runs WHERE id = ?", (run_id,)).fetchone()
            active = db.execute(
                "SELECT id, pid, status, queued_at, gpus FROM runs WHERE status IN ('queued', 'running', 'paused')"
            )
            jobs, running, ahead = 0, 0, 0  # running jobs, the slots they take, earlier queued jobs
            for row in active.fetchall():
                if row["id"] == run_id or row["pid"] is None or not pid_alive(row["pid"]):
                    continue
                if row["status"] == "queued":
                    ahead += (row["queued_at"] or 0) < (me["queued_at"] or 0)
                else:
                    jobs, running = jobs + 1, running + (len(_gpu_list(row["gpus"])) or 1)
            if running and running + slots > max_parallel:
                if slots == 1 and running == jobs:
                    return f"waiting for {jobs} running job{'s' * (jobs > 1)} (maxParallel {max_parallel})"
                held = f"{jobs} running job{'s hold' if jobs > 1 else ' holds'} {running} GPU{'s' * (running > 1)}"
                return f"{f'needs {slots} GPUs; ' if slots > 1 else 'waiting: '}{held} (maxParallel {max_parallel} counts GPUs)"
            if ahead:
                return f"waiting behind {ahead} earlier queued job{'s' * (ahead > 1)}"
            if dry_run:
                return None
            held = ",".join(map(str, gpus)) if gpus else None
            db.execute(
                "UPDATE runs SET status = 'running', reason = NULL, heartbeat = ?, pid = ?, gpus = ?, gpu_index = ? WHERE id = ?",
                (time.time(), os.getpid(), held, gpus[0] if gpus else None, run_id),
            )
            return None

    def gpus_in_use(self, except_run: str | None = None) -> set[int]:
        """The GPUs that running or paused jobs hold (live workers only)."""
        with self._connect() as db:
            rows = db.execute("SELECT id, pid, gpus FROM runs WHERE status IN ('running', 'paused') AND gpus IS NOT NULL")
            return {i for r in rows.fetchall() if r["id"] != except_run and r["pid"] and pid_alive(r["pid"])
                    for i in _gpu_list(r["gpus"])}  # fmt: skip

    def claim_for_resume(self, run_id: str, claimant: int) -> RunRecord:
        """Queue a resumable run again for exactly one resumer (pid `claimant`, until its worker takes over).

        One IMMEDIATE transaction: of two resumes at once, the second finds the run queued under a live pid and
        gets STATE_RUN_ACTIVE, as does a resume while the run's worker (or whoever trains it) still lives."""
        with self._write() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise BackpropError("INPUT_RUN_NOT_FOUND", run_id=run_id)
            run = self._record(row)
            refuse_unless_resumable(run)
            now = time.time()
            db.execute(
                "UPDATE runs SET status = 'queued', queued_at = ?, reason = NULL, pid = ?, heartbeat = ?, ended_at = NULL,"
                " error_code = NULL, error_message = NULL WHERE id = ?",
                (now, claimant, now, run_id),
            )
        return self.get(run_id)

    def delete(self, run_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # ------------------------------------------------------------ checkpoints

    def add_checkpoint(self, run_id: str, step: int, path: Path) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, step, path, created_at) VALUES (?, ?, ?, ?)",
                (run_id, step, str(path), time.time()),
            )

    def remove_checkpoint(self, run_id: str, step: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM checkpoints WHERE run_id = ? AND step = ?", (run_id, step))

    def checkpoints(self, run_id: str) -> list[Checkpoint]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
        return [Checkpoint(**dict(r)) for r in rows]

    # ------------------------------------------------------------ multi-runs

    def record_forgetting(self, multi_run_id: str, after_run: int, eval_losses: list[float | None]) -> None:
        """One row of a multi-run's forgetting matrix: eval loss on each task seen so far, after run `after_run`."""
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO forgetting (multi_run_id, after_run, task, eval_loss) VALUES (?, ?, ?, ?)",
                [(multi_run_id, after_run, task, loss) for task, loss in enumerate(eval_losses, 1) if loss is not None],
            )

    def forgetting(self, multi_run_id: str) -> list[list[float | None]]:
        """The forgetting matrix: row i after run i+1, column j for task j+1 (None where not yet seen)."""
        with self._connect() as db:
            query = "SELECT after_run, task, eval_loss FROM forgetting WHERE multi_run_id = ?"
            rows = db.execute(query, (multi_run_id,)).fetchall()
        if not rows:
            return []
        size = max(max(r["after_run"], r["task"]) for r in rows)
        runs = max(r["after_run"] for r in rows)
        matrix: list[list[float | None]] = [[None] * size for _ in range(runs)]
        for r in rows:
            matrix[r["after_run"] - 1][r["task"] - 1] = r["eval_loss"]
        return matrix

    def children(self, parent_id: str) -> list[RunRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs WHERE parent_id = ? ORDER BY created_at", (parent_id,)).fetchall()
        return [self._refresh(self._record(r)) for r in rows]

    # ------------------------------------------------------------ exports

    def add_export(self, record: dict[str, Any]) -> None:
        values = {**record, "verification": json.dumps(record.get("verification")), "ollama": json.dumps(record.get("ollama"))}
        columns = ("id", "run_id", "format", "quantization", "path", "file", "size_bytes", "verification", "ollama", "created_at")
        with self._write() as db:
            db.execute(
                f"INSERT OR REPLACE INTO exports ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                tuple(values[c] for c in columns),
            )

    def exports(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded exports, newest first; an export whose folder was deleted since is left out."""
        query, args = "SELECT * FROM exports", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(query + " ORDER BY created_at DESC", args).fetchall()]
        for row in rows:
            row["verification"], row["ollama"] = json.loads(row["verification"] or "null"), json.loads(row["ollama"] or "null")
        return [r for r in rows if Path(r["path"]).exists()]

    # ------------------------------------------------------------ evaluations

    def add_evaluation(self, run_id: str, report: dict[str, Any]) -> dict[str, Any]:
        """Store a did-it-help report (training/evaluate.py) with its run: one INSERT, so a crash leaves it whole or
        absent. Returns the report with its `id` and `created_at`."""
        report = {**report, "id": report.get("id") or uuid.uuid4().hex[:12], "run_id": run_id,
                  "created_at": report.get("created_at") or time.time()}  # fmt: skip
        with self._write() as db:
            db.execute(
                "INSERT INTO evaluations (id, run_id, created_at, report) VALUES (?, ?, ?, ?)",
                (report["id"], run_id, report["created_at"], json.dumps(report)),
            )
        return report

    def evaluations(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """A run's stored reports, newest first."""
        query = "SELECT report FROM evaluations WHERE run_id = ? ORDER BY created_at DESC, rowid DESC"
        with self._connect() as db:
            rows = db.execute(query + (" LIMIT ?" if limit else ""), (run_id, limit) if limit else (run_id,)).fetchall()
        return [json.loads(r["report"]) for r in rows]

    def latest_evaluation(self, run_id: str) -> dict[str, Any] | None:
        found = self.evaluations(run_id, limit=1)
        return found[0] if found else None

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        values = dict(row)
        values["params"] = json.loads(values["params"] or "{}")
        return RunRecord(**{k: values[k] for k in _COLUMNS})

    def _refresh(self, run: RunRecord) -> RunRecord:
        """Mark a run interrupted when its worker is gone (dead pid, or a heartbeat long silent)."""
        if run.status not in ACTIVE or run.pid is None:
            return run
        silent = run.heartbeat is not None and time.time() - run.heartbeat > STALE_HEARTBEAT_S
        if pid_alive(run.pid) and not silent:
            return run
        with self._write() as db:
            db.execute(
                "UPDATE runs SET status = 'interrupted', ended_at = ?, reason = NULL"
                " WHERE id = ? AND status IN ('queued', 'running', 'paused')",
                (time.time(), run.id),
            )
        run.status = "interrupted"
        return run


def _held(run: RunRecord) -> bool:
    """Does a live process still hold this run? An active run's pid (unless its heartbeat went silent), and any
    run's own worker, even after it wrote its final status or went silent (a second worker would fight it)."""
    if run.pid is None:
        return False
    if run.status in ACTIVE and pid_alive(run.pid):
        silent = run.heartbeat is not None and time.time() - run.heartbeat > STALE_HEARTBEAT_S
        if not silent:
            return True
    return worker_alive(run.pid, run.path)


def _gpu_list(gpus: str | None) -> list[int]:
    return [int(i) for i in gpus.split(",") if i.strip()] if gpus else []


def worker_alive(pid: int, run_dir: Path) -> bool:
    """Is `pid` a live `python -m training.worker RUN_DIR` for this run (not some process that reused the pid)?"""
    import psutil

    if not pid_alive(pid):
        return False
    try:
        command = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "training.worker" in command and str(run_dir) in command


def refuse_unless_resumable(run: RunRecord) -> None:
    """STATE_* unless `run` may be resumed now: not held by a live worker, resumable, and not a multi-run's child
    (its multi-run's worker trains it: resuming the child alone would put two trainers on it)."""
    if run.parent_id:
        raise BackpropError("STATE_NOT_RESUMABLE", run_id=run.id, reason=f"it is a run of multi-run {run.parent_id}",
                            hint=f"Resume the multi-run: backprop resume {run.parent_id}")  # fmt: skip
    held = _held(run)
    if held and run.status in ACTIVE:
        raise BackpropError("STATE_RUN_ACTIVE", run_id=run.id, status=run.status, pid=run.pid)
    if held:  # its status says it ended, but its worker lives on (finishing, or hung)
        raise BackpropError("STATE_RUN_ACTIVE", run_id=run.id, status=run.status, pid=run.pid,
                            message=f"Run {run.id} is {run.status}, but its worker (pid {run.pid}) is still alive",
                            hint=f"Wait for it to exit, or end it with `kill {run.pid}`, then resume.")  # fmt: skip
    status = "interrupted" if run.status in ACTIVE else run.status  # its holder is gone
    if status not in RESUMABLE:
        raise BackpropError("STATE_NOT_RESUMABLE", run_id=run.id, reason=f"it is {status}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True
