"""An SQLite writer for compatibility tests: holds /data/app.db open in the journal mode given
(wal or delete) and commits one row every 50 ms, numbered 1, 2, 3, ... so that a missing one
shows. Every 20 rows it checks the database through its own connection and prints
`check rows=C max=M integrity=ok`; a failed write is printed with SQLite's own error name and
retried."""
import sqlite3
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "wal"
db = sqlite3.connect("/data/app.db", isolation_level=None, timeout=5)
print("journal_mode", db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0], flush=True)
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, at REAL)")
n = db.execute("SELECT COALESCE(MAX(n), 0) FROM t WHERE n > 0").fetchone()[0]
while True:
    try:
        db.execute("INSERT INTO t (n, at) VALUES (?, ?)", (n + 1, time.time()))
        n += 1
        if n % 20 == 0:
            rows, top = db.execute("SELECT COUNT(*), MAX(n) FROM t WHERE n > 0").fetchone()
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            print(f"check rows={rows} max={top} integrity={integrity}", flush=True)
    except sqlite3.Error as e:
        print(f"write {n + 1} failed: {getattr(e, 'sqlite_errorname', '?')}: {e}", flush=True)
        time.sleep(0.5)
    time.sleep(0.05)
