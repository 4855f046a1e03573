"""The tool's own small listener for a long migration: while the app is stopped (a migration the running
release cannot live with, longer than clients wait), the env's socket activates this instead of the app,
and every request gets a quick `503 Service Unavailable` with `Retry-After` and a short page, instead of
hanging in the queue. Nothing here touches the app's data.

Run by systemd as the socket's holder unit (units.hold), with the socket passed as fd 3 (LISTEN_FDS):

    python -m safedeploy.maintenance --retry-after SECONDS [--page FILE]

The page: FILE when given and a regular file of at most 64 KiB inside its own folder, no link out of it (a deploy
passes the new release's `maintenance.html`, so an app replaces the page by committing that file; one
committed as a symlink, to a secret or anywhere, is not served), else a few lines saying the app is being
upgraded and when to try again. Standard library only: it runs under the same python as the scripts.
"""

import argparse
import html
import os
import signal
import socket
import stat
import sys
import threading

LISTEN_FDS_START = 3
READ_TIMEOUT = 1.0          # a client that sends nothing is let go after this
HEAD_LIMIT = 16384


def default_page(retry_after):
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>Upgrading</title></head><body>"
            "<h1>Back in a moment</h1><p>This site is being upgraded. Please try again in "
            f"{html.escape(str(retry_after))} seconds.</p></body></html>\n")


def response(page, retry_after):
    body = page.encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            f"Retry-After: {retry_after}\r\n"
            "Content-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


def answer(conn, reply):
    try:
        conn.settimeout(READ_TIMEOUT)
        seen = b""
        while b"\r\n\r\n" not in seen and len(seen) < HEAD_LIMIT:
            chunk = conn.recv(4096)
            if not chunk:
                break
            seen += chunk
        conn.sendall(reply)
    except OSError:
        pass                # the client went away, or sent nothing in time: nothing to do
    finally:
        conn.close()


def serve(listener, reply, stopping):
    """Answer until stopping is set (SIGTERM: the deploy gives the socket back to the app), then finish
    the answers begun: a connection accepted here is never cut off. Connections not yet accepted stay in
    the socket's queue for the app."""
    listener.settimeout(0.1)
    answering = []
    while not stopping.is_set():
        try:
            conn, _ = listener.accept()
        except (socket.timeout, InterruptedError):
            continue
        t = threading.Thread(target=answer, args=(conn, reply), daemon=True)
        t.start()
        answering = [a for a in answering if a.is_alive()] + [t]
    for t in answering:
        t.join(READ_TIMEOUT + 1)


PAGE_LIMIT = 65536          # bytes: a page is a few lines; anything larger is not served


def read_page(path):
    """The page's text, or None (the default page): only a regular file inside the page's own folder (the
    release), never through a link out of it (a `maintenance.html` committed as a symlink to a password
    file would serve the secret to every client; the release's `instance` links to the live data), not a
    FIFO or a device (it would hang or never end), and at most PAGE_LIMIT bytes."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    real = os.path.realpath(path)       # a link is followed only to a file inside the page's own folder
    if os.path.commonpath([folder, real]) != folder:
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None         # missing, or replaced by a link since
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > PAGE_LIMIT:
            return None
        data = os.read(fd, PAGE_LIMIT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data[:PAGE_LIMIT].decode("utf-8", errors="replace") if len(data) <= PAGE_LIMIT else None


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer 503 with Retry-After on the socket systemd passes (fd 3).")
    p.add_argument("--retry-after", type=int, default=30)
    p.add_argument("--page")
    args = p.parse_args(argv)
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("maintenance: no socket passed by systemd (LISTEN_FDS)", file=sys.stderr)
        return 2
    page = (read_page(args.page) if args.page else None) or default_page(args.retry_after)
    listener = socket.socket(fileno=LISTEN_FDS_START)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    serve(listener, response(page, max(1, args.retry_after)), stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
