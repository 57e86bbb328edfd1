"""Working on a reproduction in Jupyter: the project's kernel (installed by ``make setup`` inside .venv), a
quick notebook executed through Jupyter's own client on it, scratch copies, and ``vlmdefense open`` serving
one on localhost (no browser)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from vlmdefense.runs.jupyter import PROJECT_KERNEL, project_kernel_spec, runner_kernel, write_scratch_copy

SPEC = project_kernel_spec()
needs_kernel = pytest.mark.skipif(
    SPEC is None, reason=f"the {PROJECT_KERNEL!r} kernel is not installed in this environment (`make setup` does it)"
)


def make_repo(tmp_path: Path) -> Path:
    """A repository with the baseline notebook, the profiles and the catalog."""
    import shutil

    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "notebooks" / "baseline.ipynb", root / "notebooks" / "baseline.ipynb")
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    shutil.copytree(REPO / "catalog", root / "catalog")
    return root


def parameters(path: Path) -> dict:
    """The values the ``parameters`` cell of a notebook sets."""
    notebook = nbformat.read(str(path), as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    return {key: namespace[key] for key in ("profile", "overrides", "result_path")}


@needs_kernel
def test_make_setup_installs_the_project_kernel_inside_the_environment() -> None:
    assert SPEC is not None
    assert SPEC.display_name == "VLM Defense Atlas (.venv)" and SPEC.language == "python"
    assert Path(SPEC.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve()), "nothing in the home"
    interpreter = Path(SPEC.argv[0])
    assert interpreter.absolute().parent.parent == Path(sys.prefix).absolute(), "this environment's python"
    assert interpreter.resolve() == Path(sys.executable).resolve()
    assert runner_kernel() == PROJECT_KERNEL


def test_a_scratch_copy_carries_the_parameters_and_keeps_the_users_edits(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    copy = write_scratch_copy(root, "baseline", "quick", {"n_test": 20, "eps": ["4/255"]})
    assert copy.created and copy.path.parent == root / "scratch"
    assert re.fullmatch(r"baseline-quick-eps=4_255,n_test=20-[0-9a-f]{6}\.ipynb", copy.path.name)
    assert parameters(copy.path) == {
        "profile": "quick",
        "overrides": {"n_test": 20, "eps": ["4/255"]},
        "result_path": "",
    }
    notebook = nbformat.read(str(copy.path), as_version=4)
    if runner_kernel() is not None:
        assert notebook.metadata.kernelspec.name == PROJECT_KERNEL
    assert (root / "notebooks" / "baseline.ipynb").read_bytes() == (REPO / "notebooks" / "baseline.ipynb").read_bytes()
    copy.path.write_text(copy.path.read_text().replace("Baseline", "My baseline"))
    again = write_scratch_copy(root, "baseline", "quick", {"n_test": 20, "eps": ["4/255"]})
    assert not again.created and "My baseline" in again.path.read_text(), "an existing copy is kept"
    fresh = write_scratch_copy(root, "baseline", "quick", {"n_test": 20, "eps": ["4/255"]}, fresh=True)
    assert fresh.created and "My baseline" not in fresh.path.read_text()
    assert write_scratch_copy(root, "baseline", "smoke").path.name == "baseline-smoke.ipynb"
    with pytest.raises(FileNotFoundError):
        write_scratch_copy(root, "nope", "quick")


@pytest.fixture(scope="module")
def small_clip() -> Path:
    """The small CLIP in the test run's cache, trained here (once per run) rather than inside a kernel."""
    from vlmdefense.workbench.models import ensure_small_clip

    return ensure_small_clip(progress=False)


@needs_kernel
@pytest.mark.slow
def test_a_quick_notebook_runs_through_jupyters_client_on_the_project_kernel(tmp_path: Path, small_clip: Path) -> None:
    from nbclient import NotebookClient

    root = make_repo(tmp_path)
    copy = write_scratch_copy(root, "baseline", "quick", {"n_test": 20})
    notebook = nbformat.read(str(copy.path), as_version=4)
    assert notebook.metadata.kernelspec.name == PROJECT_KERNEL
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(ctx.profile, ctx.params['n_test'], sys.prefix)"))
    resources = {"metadata": {"path": str(copy.path.parent)}}
    NotebookClient(notebook, timeout=300, kernel_name=PROJECT_KERNEL, resources=resources).execute()
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    assert printed.split() == ["quick", "20", sys.prefix]
    assert notebook.metadata.language_info.name == "python"
    assert not list((root / "reproductions").glob("*/*/result.json")), "a scratch copy records nothing"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lines(stream, into: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        into.put(line)


@pytest.mark.slow
def test_open_serves_the_scratch_copy_on_localhost_until_stopped(tmp_path: Path) -> None:
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (`make setup` installs the jupyter extra)")
    root = make_repo(tmp_path)
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "VLMDEFENSE_ROOT": str(root)}
    command = [sys.executable, "-m", "vlmdefense", "open", "baseline", "--profile", "quick", "-p", "n_test=20"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [*command, "--no-browser", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        printed = ""
        deadline = time.monotonic() + 60
        while "JupyterLab: " not in printed and time.monotonic() < deadline and process.poll() is None:
            try:
                printed += lines.get(timeout=1)
            except queue.Empty:
                continue
        assert "JupyterLab: " in printed, printed + (tmp_path / "server.log").read_text()
        scratch = re.search(r"scratch copy: (scratch/\S+\.ipynb)", printed)
        url = re.search(r"JupyterLab: (http://127\.0\.0\.1:(\d+)/lab/tree/(\S+)\?token=(\w+))", printed)
        assert scratch and url and int(url.group(2)) == port and url.group(3) == scratch.group(1)
        copy = root / scratch.group(1)
        assert parameters(copy) == {"profile": "quick", "overrides": {"n_test": 20}, "result_path": ""}
        api = f"http://127.0.0.1:{port}/api/contents/{scratch.group(1)}?content=0&token={url.group(4)}"
        with urllib.request.urlopen(api, timeout=10) as response:
            assert response.status == 200, "the server serves the scratch copy"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents/{scratch.group(1)}", timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            log.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)


def test_open_refuses_unknown_methods_profiles_and_overrides_before_starting_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlmdefense.cli import app

    root = make_repo(tmp_path)
    env = {"VLMDEFENSE_ROOT": str(root)}
    runner = CliRunner()
    assert runner.invoke(app, ["open", "nope", "--no-browser"], env=env).exit_code == 1
    assert runner.invoke(app, ["open", "baseline", "--profile", "nope", "--no-browser"], env=env).exit_code == 2
    assert runner.invoke(app, ["open", "baseline", "-p", "novalue", "--no-browser"], env=env).exit_code == 2
    assert not (root / "scratch").exists(), "nothing written on a refused call"
