"""A key-value service on Python's http.server, for the compatibility suite (bench/compat): one
thread serving one HTTP/1.1 keep-alive connection at a time, as http.server does by default.

    kv-server.py PORT memory        keys in a dict (state in memory only)
    kv-server.py PORT wal|delete    keys as rows of /data/kv.db, SQLite in that journal mode

PUT /k/I stores the request body as key I (an upsert: a replayed PUT is harmless) and answers
204 once it is stored (SQLite: committed). GET /range?from=A&to=B answers `I VALUE` lines for
the keys of A..B that exist, read with SQLite's own SELECT from the database file (or the dict).
GET /ping answers `ok`. One connection owns the database: a second one opened after a restore
is unsafe in WAL mode (docs/compatibility.md, "file locks")."""
import http.server
import sqlite3
import sys
from urllib.parse import parse_qs, urlparse

port = int(sys.argv[1])
mode = sys.argv[2]


class MemoryStore:
    def __init__(self):
        self.keys = {}

    def put(self, key, value):
        self.keys[key] = value

    def range(self, first, last):
        return [(k, self.keys[k]) for k in range(first, last + 1) if k in self.keys]


class SqliteStore:
    def __init__(self, journal_mode):
        self.db = sqlite3.connect("/data/kv.db", isolation_level=None, timeout=5)
        got = self.db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        if got != journal_mode:
            raise SystemExit(f"journal_mode {journal_mode}: SQLite says {got}")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")

    def put(self, key, value):
        self.db.execute("INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (key, value))

    def range(self, first, last):
        return self.db.execute("SELECT k, v FROM kv WHERE k BETWEEN ? AND ? ORDER BY k", (first, last)).fetchall()


store = MemoryStore() if mode == "memory" else SqliteStore(mode)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/ping":
            return self.answer(200, b"ok")
        if url.path == "/range":
            q = parse_qs(url.query)
            rows = store.range(int(q["from"][0]), int(q["to"][0]))
            return self.answer(200, "".join(f"{k} {v}\n" for k, v in rows).encode())
        self.answer(404, b"no such path\n")

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        if not self.path.startswith("/k/"):
            return self.answer(404, b"no such path\n")
        try:
            store.put(int(self.path[3:]), body)
        except sqlite3.Error as e:
            return self.answer(500, f"{getattr(e, 'sqlite_errorname', '?')}: {e}\n".encode())
        self.answer(204)

    def log_message(self, *args):
        pass


print(f"listening on {port}, {mode}", flush=True)
http.server.HTTPServer(("0.0.0.0", port), Handler).serve_forever()
