"""`make lab` serves JupyterLab on the notebooks: start it headless, list the notebooks, stop it."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_the_notebooks(tmp_path):
    port, token = free_port(), "course-test-token"
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        ["make", "--no-print-directory", "lab", f"LAB_PORT={port}",
         f"LAB_ARGS=--IdentityProvider.token={token} --ServerApp.open_browser=False"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )
    try:
        listing, deadline = None, time.time() + 120
        while time.time() < deadline and listing is None:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=5) as r:
                    listing = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert listing is not None, "JupyterLab did not answer:\n" + (tmp_path / "lab.log").read_text()
        served = {item["name"] for item in listing["content"]}
        assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= served
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
        output = (tmp_path / "lab.log").read_text()
        assert f"http://127.0.0.1:{port}/lab?token=" in output, "make lab prints the URL to open"
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Stop make and the JupyterLab it started (the whole process group)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
