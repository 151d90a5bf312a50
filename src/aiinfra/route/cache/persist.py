"""Entries on disk, in SQLite in WAL mode: a transaction is whole or absent after a crash, so a kill mid-write
loses at most the newest entries and never leaves a file that opens wrongly. Every call runs on one writer
thread, never on the event loop."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from aiinfra.route.cache.store import Entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY, partition TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL, answer BLOB NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL)
"""


class DiskLog:
    """The SQLite file of one gateway (or several sharing one machine's disk)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash of the process never loses a commit
        self.db.execute(SCHEMA)

    def load(self, now: float) -> list[Entry]:
        """The live entries, oldest first; expired ones are deleted."""
        self.db.execute("DELETE FROM entries WHERE expires <= ?", (now,))
        rows = self.db.execute("SELECT id, partition, text, vector, answer, created, expires FROM entries "
                               "ORDER BY created").fetchall()
        return [Entry(partition, text, np.frombuffer(vector, dtype=np.float32).copy(), answer, created, expires, key)
                for key, partition, text, vector, answer, created, expires in rows]

    def put(self, entries: list[Entry]) -> None:
        """Write entries in one transaction."""
        rows = [(e.id, e.partition, e.text, e.vector.astype(np.float32).tobytes(), e.answer, e.created, e.expires)
                for e in entries]
        self._transaction("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def delete(self, keys: list[str]) -> None:
        self._transaction("DELETE FROM entries WHERE id = ?", [(key,) for key in keys])

    def _transaction(self, statement: str, rows: list[tuple]) -> None:
        self.db.execute("BEGIN")
        try:
            self.db.executemany(statement, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
