"""Files the tool serves or reads as secrets are regular files where expected (issue 29, findings 5 and 6):
the 503 page only a regular file inside the release (no link out of it, bounded), and `[offsite]
password_file` a regular file, checked when the config loads."""

import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from demo.sandbox import REPO_ROOT

from helpers import one_line_error

MAINTENANCE = REPO_ROOT / "safedeploy" / "maintenance.py"


def serve_503(page, port_holder):
    """The tool's listener as systemd runs it (units.hold): the socket passed as fd 3, LISTEN_PID its own."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port_holder.append(listener.getsockname()[1])

    def as_fd_3():
        os.dup2(listener.fileno(), 3)
        os.set_inheritable(3, True)

    code = ("import os, runpy, sys; os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
            f"sys.argv = [{str(MAINTENANCE)!r}, '--retry-after', '40', '--page', {str(page)!r}]; "
            f"runpy.run_path({str(MAINTENANCE)!r}, run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], preexec_fn=as_fd_3, pass_fds=(3, listener.fileno()),
                            stdin=subprocess.DEVNULL)
    listener.close()
    return proc


def body_served(page):
    port = []
    proc = serve_503(page, port)
    try:
        for _ in range(50):
            try:
                answer = requests.get(f"http://127.0.0.1:{port[0]}/", timeout=5)
                assert answer.status_code == 503 and answer.headers["Retry-After"] == "40"
                return answer.text
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("the listener never answered")
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_503_page_never_serves_a_file_outside_the_release(tmp_path):
    secret = tmp_path / "borg-password"
    secret.write_text("correct horse battery staple\n")
    os.chmod(secret, 0o600)
    release = tmp_path / "releases" / "r1"
    release.mkdir(parents=True)
    page = release / "maintenance.html"
    page.symlink_to(secret)                                  # committed as a symlink to the password file
    text = body_served(page)
    assert "correct horse" not in text and "Back in a moment" in text
    page.unlink()
    (release / "pages").mkdir()
    (release / "pages" / "down.html").write_text("<h1>moving posts</h1>\n")
    page.symlink_to(release / "pages" / "down.html")        # a link inside the release is the release's page
    assert "moving posts" in body_served(page)
    page.unlink()
    os.mkfifo(page)                                          # a FIFO would hang the listener
    assert "Back in a moment" in body_served(page)
    page.unlink()
    page.write_text("x" * (1 << 20))                         # bounded: a huge page is not served
    assert "Back in a moment" in body_served(page)
    page.write_text("<h1>flaskr is moving its posts</h1>\n")
    assert "flaskr is moving its posts" in body_served(page)


@pytest.mark.both_converted         # it breaks the config or the state first
def test_a_password_file_that_is_not_a_regular_file_is_refused_at_load(sandbox):
    sb = sandbox
    base = sb.config.read_text()
    fifo = sb.root / "restic-password.fifo"
    os.mkfifo(fifo, 0o600)
    link = sb.root / "password-link"
    link.symlink_to(fifo)
    for path, kind in ((fifo, "a FIFO"), (link, "a FIFO, through a link"), ("/dev/null", "a character device")):
        sb.config.write_text(base + f'\n[offsite]\nrepository = "{sb.root / "repo"}"\npassword_file = "{path}"\n')
        for argv in (("backup.py", "dev"), ("status.py",)):
            start = time.monotonic()
            proc = sb.run(*argv, timeout=60)
            assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
            line = one_line_error(proc)
            assert "offsite.password_file" in line and kind in line, line
            assert time.monotonic() - start < 20
