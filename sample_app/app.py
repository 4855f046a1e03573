"""A small sample web app for the demo and the tests (standard library only).

It stands in for the operator's Flask app: an HTTP server on a loopback port
with an SQLite database in WAL mode, a /health route, and /_deploy/status
reporting the REVISION file that deploy.py writes (when DEPLOY_STATUS=1).

Its behaviour is set by the file MODE beside it, so a test can commit a bad
release: "ok", "crash" (exits at start), "http500" (health answers 500),
"nobind" (runs but never listens), "slow SECONDS" (starts late),
"hanghealth" (/health never answers), "hangstop" (ignores SIGTERM), "drip"
(/health sends its headers, then one byte every 0.2 s for two minutes),
"needs MODULE VERSION" (imports MODULE and exits at start unless its __version__
is VERSION: a release that runs only on its own dependencies), "dieafter SECONDS"
(serves, then exits with an error after SECONDS), "crashonrow TEXT" (exits at
start when a note's body is TEXT: code that chokes on a row only prod has),
"deleteposts NAME" (at start, deletes the posts of the user NAME: a data bug).

With a schema that has flaskr's tables (user, and post with author_id REFERENCES user),
it also serves POST /users (name=...), POST /posts (author_id=...&body=...) and GET /posts.
"""

import argparse
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_mode():
    try:
        words = (HERE / "MODE").read_text().split()
    except FileNotFoundError:
        words = []
    return (words or ["ok"])[0], words[1:]


def open_db(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA busy_timeout = 10000")
    schema = HERE / "schema.sql"
    if schema.exists():
        conn.executescript(schema.read_text())
    return conn


def make_handler(conn, mode, version, deps=None):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                if mode == "hanghealth":
                    time.sleep(120)
                if mode == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "600")
                    self.end_headers()
                    for _ in range(600):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                    return None
                conn.execute("SELECT 1").fetchone()
                return self.reply(500 if mode == "http500" else 200, {"ok": mode != "http500"})
            if self.path == "/_deploy/status" and os.environ.get("DEPLOY_STATUS") == "1":
                try:
                    return self.reply(200, json.loads((HERE / "REVISION").read_text()))
                except (OSError, ValueError):
                    return self.reply(404, {"error": "no REVISION"})
            if self.path == "/":
                notes = conn.execute("SELECT count(*) FROM notes").fetchone()[0]
                return self.reply(200, {"app": "sample", "version": version, "notes": notes, "deps": deps or {}})
            if self.path == "/posts":
                rows = conn.execute('SELECT p.id, u.name, p.body FROM post p JOIN "user" u ON u.id = p.author_id '
                                    "ORDER BY p.id").fetchall()
                return self.reply(200, [{"id": i, "author": a, "body": b} for i, a, b in rows])
            return self.reply(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            text = self.rfile.read(length).decode(errors="replace")
            if self.path == "/notes":
                cur = conn.execute("INSERT INTO notes (body) VALUES (?)", (text,))
                return self.reply(201, {"id": cur.lastrowid})
            form = dict(urllib.parse.parse_qsl(text))
            if self.path == "/users":
                cur = conn.execute('INSERT INTO "user" (name) VALUES (?)', (form["name"],))
                return self.reply(201, {"id": cur.lastrowid})
            if self.path == "/posts":
                cur = conn.execute("INSERT INTO post (author_id, body) VALUES (?, ?)", (int(form["author_id"]), form["body"]))
                return self.reply(201, {"id": cur.lastrowid})
            return self.reply(404, {"error": "not found"})

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default="instance/app.db")
    args = parser.parse_args()
    mode, extra = read_mode()
    print(f"sample app starting: mode={mode} port={args.port}", flush=True)
    if mode == "crash":
        print("sample app: crashing on start, as MODE asks", file=sys.stderr, flush=True)
        sys.exit(3)
    deps = {}
    if mode == "needs":
        module, wanted = extra[0], extra[1]
        try:
            found = getattr(__import__(module), "__version__", "?")
        except ImportError:
            found = "not installed"
        if found != wanted:
            print(f"sample app: needs {module} {wanted}, found {found}", file=sys.stderr, flush=True)
            sys.exit(4)
        deps[module] = found
    if mode == "hangstop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a unit that hangs on stop
    if mode == "slow":
        time.sleep(float(extra[0]) if extra else 1.0)
    version = (HERE / "VERSION").read_text().strip() if (HERE / "VERSION").exists() else "?"
    conn = open_db(Path(args.db))
    if mode == "nobind":
        while True:
            time.sleep(3600)
    if mode == "crashonrow":
        text = " ".join(extra)
        if conn.execute("SELECT count(*) FROM notes WHERE body = ?", (text,)).fetchone()[0]:
            print(f"sample app: crashes on a row it cannot render: {text!r}", file=sys.stderr, flush=True)
            sys.exit(5)
    if mode == "deleteposts":
        conn.execute('DELETE FROM post WHERE author_id IN (SELECT id FROM "user" WHERE name = ?)', (" ".join(extra),))
    if mode == "dieafter":
        def die():
            time.sleep(float(extra[0]) if extra else 3.0)
            print("sample app: dying, as MODE asks", file=sys.stderr, flush=True)
            os._exit(6)
        threading.Thread(target=die, daemon=True).start()
    server = make_server(args.port, make_handler(conn, mode, version, deps))
    stop_gracefully_on_sigterm(server)
    notify_ready()
    print("sample app ready", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()           # waits for the requests in flight
    print("sample app stopped", flush=True)


def make_server(port, handler):
    """Listen on the socket systemd passes (socket activation), else bind the port."""
    ThreadingHTTPServer.daemon_threads = False
    ThreadingHTTPServer.block_on_close = True
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=3)
        server.server_address = server.socket.getsockname()
        print("sample app: listening on the socket systemd passed", flush=True)
        return server
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def stop_gracefully_on_sigterm(server):
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    if read_mode()[0] != "hangstop":
        signal.signal(signal.SIGTERM, stop)


def notify_ready():
    """sd_notify(READY=1) for Type=notify units."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(b"READY=1")


if __name__ == "__main__":
    main()
