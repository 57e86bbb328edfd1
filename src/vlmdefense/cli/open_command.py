"""``vlmdefense open ID``: a scratch copy of a method's notebook, opened in JupyterLab on localhost."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from vlmdefense.cli.common import app, err, fail, out, repo_root, require_notebooks, run_setup

HOST = "127.0.0.1"
DEFAULT_PORT = 8888
READY_SECONDS = 90.0


def free_port(start: int = DEFAULT_PORT, tries: int = 50) -> int:
    """The first port from ``start`` on that nothing listens on at localhost."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    fail(f"no free port in {start}-{start + tries - 1}: give one with --port", code=2)


def server_command(root: Path, notebook: Path, port: int, browser: bool) -> list[str]:
    """JupyterLab on ``127.0.0.1:port`` serving the repository, with ``notebook`` open."""
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        str(notebook.relative_to(root)),
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.open_browser={browser}",
        # Jupyter refuses root unless told; containers (CI) often run as root, and the server stays on localhost.
        *(["--ServerApp.allow_root=True"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
    ]


def wait_ready(process: subprocess.Popen[bytes], port: int, token: str, seconds: float = READY_SECONDS) -> bool:
    """Poll the server's ``/api/status`` until it answers (True), the process ends or time runs out."""
    request = urllib.request.Request(f"http://{HOST}:{port}/api/status", headers={"Authorization": f"token {token}"})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _say(text: str) -> None:
    out.print(text, highlight=False, markup=False)
    sys.stdout.flush()


@app.command("open")
def open_notebook(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="Method id.")],
    profile: Annotated[str, typer.Option("--profile", help="Profile written into the parameters cell.")] = "smoke",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE override (YAML value); repeatable.")
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL instead of opening it.")] = False,
    port: Annotated[
        int | None, typer.Option("--port", help="Port on 127.0.0.1 (default: 8888 or the next free).")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Overwrite an existing scratch copy.")] = False,
) -> None:
    """Copy notebooks/ID.ipynb to scratch/ (profile and overrides in its parameters cell, the project's
    kernel in its metadata) and open it in JupyterLab on localhost; Ctrl-C stops the server."""
    from vlmdefense.runs.jupyter import write_scratch_copy

    root = repo_root()
    _, overrides = run_setup(root, profile, param)
    require_notebooks(root, [method_id])
    if importlib.util.find_spec("jupyterlab") is None:
        fail("JupyterLab is not installed: run `make setup` (or pip install -e '.[jupyter]')")
    try:
        copy = write_scratch_copy(root, method_id, profile, overrides, fresh=fresh)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    shown = copy.path.relative_to(root)
    if copy.created:
        kernel = copy.kernel or "the notebook's own (run `make setup` to install the project's)"
        _say(f"scratch copy: {shown} (git-ignored; kernel {kernel})")
    else:
        _say(f"scratch copy: {shown} already exists: your edits are kept (--fresh starts from the notebook again)")
    port = port if port is not None else free_port()
    token = secrets.token_hex(24)
    url = f"http://{HOST}:{port}/lab/tree/{shown.as_posix()}?token={token}"
    env = {**os.environ, "JUPYTER_TOKEN": token}  # not on the command line, where `ps` would show it
    process = subprocess.Popen(
        server_command(root, copy.path, port, browser=not no_browser), cwd=root, env=env, start_new_session=True
    )
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if not wait_ready(process, port, token):
            code = process.poll()
            fail(f"JupyterLab did not start on {HOST}:{port}" + (f" (exit {code})" if code is not None else ""))
        _say(f"JupyterLab: {url}")
        _say(f"serving {root} on {HOST}:{port} until Ctrl-C")
        process.wait()
    except KeyboardInterrupt:
        err.print("stopping JupyterLab", highlight=False)
    finally:
        _stop(process)
        signal.signal(signal.SIGTERM, previous)
