"""The executor's durable state in SQLite: written before any grant is acknowledged.

One transaction per executor call holds every change that call made (``Scheduler.drain_changes``),
so a burst of grants costs one commit. WAL mode with ``synchronous=NORMAL`` survives the death of
the executor's process, which is what Ray restarts; it does not promise durability through a power
cut of the machine.

A failed write raises :class:`StateWriteError` and leaves the file as it was (the transaction is
rolled back); a file that cannot be read raises :class:`StateMissingError`. The file is created
with mode 0600: it holds every token id, which is what a process needs to spend a budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_quota._core.state import Changes, SavedLease, SavedResource, SavedToken
from ray_quota._errors import StateMissingError, StateWriteError
from ray_quota._spec import Enforcement, FeedbackSpec, Kind, ResourceSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, pool REAL NOT NULL, vtime REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, resource TEXT NOT NULL, expected_use INTEGER NOT NULL,
    pass REAL NOT NULL, generation INTEGER NOT NULL, claimant TEXT, label TEXT, parent TEXT);
CREATE TABLE IF NOT EXISTS leases (
    token_id TEXT NOT NULL, lease_key TEXT NOT NULL, resource TEXT NOT NULL,
    units INTEGER NOT NULL, returned INTEGER NOT NULL, used INTEGER NOT NULL,
    debt INTEGER NOT NULL, moved_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, lease_key));
CREATE TABLE IF NOT EXISTS ended_leases (
    token_id TEXT NOT NULL, lease_key TEXT NOT NULL, debt INTEGER NOT NULL,
    PRIMARY KEY (token_id, lease_key));
"""


@dataclass(frozen=True, slots=True)
class SavedState:
    """Everything a restarted executor needs."""

    cluster_id: str
    environment: str
    saved_at: float  # wall-clock seconds, to refill rate pools for the time spent down
    resources: list[SavedResource]
    tokens: list[SavedToken]
    leases: list[SavedLease]
    ended: list[tuple[str, str, int]]  # lease keys never to be used again, oldest first


class StateStore:
    """A SQLite file holding one executor's state.

    Example:
        >>> store = StateStore(tmp_path / "state.sqlite")
        >>> store.start("cluster-1", "local")
        >>> store.load().cluster_id
        'cluster-1'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Created private before SQLite opens it; SQLite gives its -wal and -shm files the
            # same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Small pages for a new file (an existing one keeps its own): a grant rewrites one
            # row in each of about four tables, and each commit appends every page it touched
            # to the WAL; at 1 KiB instead of 4 KiB the executor path's commit took about half
            # as long (``python -m bench.exec_path``, bench/PROFILE.md).
            self._db.execute("PRAGMA page_size=1024")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(leases)")}
            if "holder" in columns:  # written by 0.1, which called the lease key a holder
                self._db.execute("ALTER TABLE leases RENAME COLUMN holder TO lease_key")
            if "moved_out" not in columns:  # written before adoptions were stored
                self._db.execute("ALTER TABLE leases ADD COLUMN moved_out INTEGER NOT NULL "
                                 "DEFAULT 0")
            if "parent" not in {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}:
                self._db.execute("ALTER TABLE tokens ADD COLUMN parent TEXT")  # an older file
        except (sqlite3.Error, OSError) as exc:
            raise _unreadable(self.path, exc) from exc
        self._specs: dict[str, ResourceSpec] = {}  # as last written: most writes keep them

    def load(self) -> SavedState | None:
        """The saved state, or None if this file holds none yet.

        Raises:
            StateMissingError: the file cannot be read (corrupt, or not a database).
        """
        try:
            return self._load()
        except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
            raise _unreadable(self.path, exc) from exc

    def _load(self) -> SavedState | None:
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        if "cluster_id" not in meta:
            return None
        resources = [SavedResource(_spec_from_json(spec), pool, vtime)
                     for spec, pool, vtime in self._db.execute(
                         "SELECT spec, pool, vtime FROM resources")]
        tokens = [SavedToken(*row) for row in self._db.execute(
            "SELECT id, resource, expected_use, pass, generation, claimant, label, parent "
            "FROM tokens")]
        leases = [SavedLease(*row) for row in self._db.execute(
            "SELECT token_id, lease_key, resource, units, returned, used, debt, moved_out "
            "FROM leases")]
        ended = list(self._db.execute(
            "SELECT token_id, lease_key, debt FROM ended_leases ORDER BY rowid"))
        return SavedState(meta["cluster_id"], meta["environment"],
                          float(meta.get("saved_at", time.time())), resources, tokens, leases,
                          ended)

    def start(self, cluster_id: str, environment: str) -> None:
        """Forget any earlier state and begin afresh for this executor."""
        self._specs.clear()
        with self._transaction("start afresh") as db:
            for table in ("meta", "resources", "tokens", "leases", "ended_leases"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("cluster_id", cluster_id), ("environment", environment),
                ("saved_at", repr(time.time()))])

    def write(self, *batches: Changes) -> None:
        """Write one call's changes (one batch or several) in one transaction, or nothing.

        Raises:
            StateWriteError: SQLite failed (disk full, locked); the file is as it was.
        """
        with self._transaction("save a call's changes") as db:
            written = [self._write(db, changes) for changes in batches]
            db.execute("INSERT OR REPLACE INTO meta VALUES ('saved_at', ?)", (repr(time.time()),))
        for specs in written:  # only once committed: a rolled-back spec is not on disk
            self._specs.update((spec.name, spec) for spec in specs)

    def _write(self, db: sqlite3.Connection, changes: Changes) -> list[ResourceSpec]:
        changed_specs = [r for r in changes.resources if self._specs.get(r.spec.name) != r.spec]
        db.executemany("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?)", [
            (r.spec.name, _spec_to_json(r.spec), r.pool, r.vtime) for r in changed_specs])
        db.executemany("UPDATE resources SET pool = ?, vtime = ? WHERE name = ?", [
            (r.pool, r.vtime, r.spec.name) for r in changes.resources])
        db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (t.id, t.resource, t.expected_use, t.pass_, t.generation, t.claimant, t.label,
             t.parent) for t in changes.tokens])
        db.executemany("DELETE FROM tokens WHERE id = ?",
                       [(token_id,) for token_id in changes.closed_tokens])
        db.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (lease.token_id, lease.key, lease.resource, lease.units, lease.returned,
             lease.used, lease.debt, lease.moved_out) for lease in changes.leases])
        db.executemany("DELETE FROM leases WHERE token_id = ? AND lease_key = ?",
                       changes.dropped_leases)
        # A replaced row gets a new rowid: rowids order the keys by when they ended. The core
        # says which ended keys it no longer needs (see ray_quota._core.ended).
        db.executemany("INSERT OR REPLACE INTO ended_leases VALUES (?, ?, ?)", changes.ended)
        db.executemany("DELETE FROM ended_leases WHERE token_id = ? AND lease_key = ?",
                       changes.forgotten)
        return [r.spec for r in changed_specs]

    def close(self, *, delete: bool = False) -> None:
        self._db.close()
        if delete:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """All of the block's statements or none; a failed COMMIT is rolled back too."""
        try:
            self._db.execute("BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateWriteError(f"could not {what} in the executor's state file {self.path}: "
                                  f"{exc}; nothing was changed") from exc


def _unreadable(path: Path, exc: BaseException) -> StateMissingError:
    return StateMissingError(
        f"cannot read the executor's state file {path}: {exc}. The executor will not start "
        "afresh on its own, since that would refill every spent budget: restore the file, or "
        "move it away to start afresh knowingly")


def _spec_to_json(spec: ResourceSpec) -> str:
    fields = asdict(spec)
    fields["kind"] = spec.kind.value
    fields["enforcement"] = spec.enforcement.value
    return json.dumps(fields, sort_keys=True)


def _spec_from_json(text: str) -> ResourceSpec:
    fields = json.loads(text)
    fields["kind"] = Kind(fields["kind"])
    fields["enforcement"] = Enforcement(fields["enforcement"])
    if "feedback" in fields:  # (rows written before it existed have the default)
        fields["feedback"] = FeedbackSpec(**fields["feedback"])
    return ResourceSpec(**fields)
