"""Scale-out through submitit: real local jobs on the quick profile, a killed job, resuming, and the Slurm
parameters a submission would carry (no cluster here: the sbatch script is rendered, not submitted).

Local jobs side by side are also what ``test_notebooks.py`` runs every notebook with."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from conftest import REPO
from vlmdefense.runs.executors import (
    ClusterOptions,
    Job,
    ReproductionJob,
    make_executor,
    resume_jobs,
    run_jobs,
    shard_jobs,
)
from vlmdefense.runs.records import RESULT_FILE
from vlmdefense.runs.staleness import RunState, output_dir, run_state

pytestmark = pytest.mark.slow


def make_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "reproductions").mkdir()
    for name in ("baseline", "tecoa"):
        shutil.copy(REPO / "notebooks" / f"{name}.ipynb", root / "notebooks")
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions")
    shutil.copytree(REPO / "catalog", root / "catalog")
    return root


def killer_notebook(path: Path) -> None:
    """A notebook whose kernel kills the job process that runs it (as an OOM killer or a preemption would)."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}\nresult_path = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_a_killed_job_keeps_the_previous_result_and_a_resume_reruns_only_it(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    logs = tmp_path / "logs"
    first, _ = run_jobs(root, [Job("baseline", "quick")], "local", ClusterOptions(), logs)
    assert first[0].state == "ran"
    record = output_dir(root, "baseline", "quick") / RESULT_FILE
    before = record.read_bytes()
    killer_notebook(root / "notebooks" / "baseline.ipynb")
    jobs = [Job("baseline", "quick", force=True), Job("tecoa", "quick")]
    outcomes, _ = run_jobs(root, jobs, "local", ClusterOptions(parallel=2), logs)
    assert [o.state for o in outcomes] == ["failed", "ran"]
    assert "log:" in outcomes[0].message
    assert record.read_bytes() == before, "a job that died must leave the previous result untouched"
    shutil.copy(REPO / "notebooks" / "baseline.ipynb", root / "notebooks" / "baseline.ipynb")
    resumed = resume_jobs(root, logs)
    assert [(j.method, j.force) for j in resumed] == [("baseline", True)]
    outcomes, _ = run_jobs(root, resumed, "local", ClusterOptions(), logs)
    assert [o.state for o in outcomes] == ["ran"] and record.read_bytes() != before


def test_a_preempted_job_is_requeued_and_lands_ok(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    executor = make_executor("local", tmp_path / "logs", ClusterOptions())
    handle = executor.submit(ReproductionJob(), str(root), Job("baseline", "quick"), 1)
    deadline = time.monotonic() + 120
    while "Loading pickle" not in (handle.stdout() or "") and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(5)  # inside the notebook by now
    # the signal Slurm sends a job before preempting it (or at its time limit), to the job's own process
    # (the local executor's controller is its parent)
    (task,) = psutil.Process(handle._process.pid).children()
    task.send_signal(signal.SIGUSR2)
    outcome = handle.result()
    assert outcome.state == "ran", outcome.message
    log = handle.stdout() or ""
    assert "this job is preempted" in log and "Requeued job" in log, log
    assert log.count("Loading pickle") == 2  # the same run, submitted again
    assert run_state(root, "baseline", "quick") is RunState.OK


def test_slurm_jobs_carry_the_requested_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    # submitit looks for `srun` before it builds a Slurm executor; a stand-in that is never run lets the
    # job script be rendered here, where no cluster exists.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    options = ClusterOptions.from_sources(
        {"partition": "gpu", "cpus": 8, "gpus": 1, "time_min": 120, "parallel": 4}, mem_gb=32, account="robust"
    )
    executor = make_executor("slurm", tmp_path / "logs", options)
    parameters = dict(executor._executor.parameters)
    script = _make_sbatch_string(command="python -m submitit", folder=str(tmp_path / "logs"), **parameters)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=120",
        "#SBATCH --mem=32GB",
        "#SBATCH --account=robust",
    ):
        assert line in script, line
    assert parameters["array_parallelism"] == 4
    assert "#SBATCH --signal=USR2@" in script  # the warning before preemption or the time limit ...
    assert executor._executor.max_num_timeout == 3  # ... after which a job is requeued up to 3 times
    job = Job("tecoa", "smoke")
    again = ReproductionJob().checkpoint(str(tmp_path), job, 8)
    assert isinstance(again.function, ReproductionJob) and again.args == (str(tmp_path), job, 8)


def test_unknown_executor_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown option.*gpu_count"):
        ClusterOptions.from_sources({"gpu_count": 2})


def test_cli_submits_local_jobs_and_status_shows_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlmdefense.cli import app

    root = make_repo(tmp_path)
    env = {"VLMDEFENSE_ROOT": str(root), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["run", "baseline", "--profile", "quick", "--executor", "local"], env=env)
    assert result.exit_code == 0, result.output
    assert "1 ran" in result.output and "logs/jobs/" in result.output
    status = CliRunner().invoke(app, ["status", "--profile", "quick"], env=env)
    assert status.exit_code == 0, status.output
    assert "last submission (local" in status.output and "ran" in status.output
    resumed = CliRunner().invoke(app, ["run", "--resume", "--executor", "local"], env=env)
    assert resumed.exit_code == 0 and "nothing to resume" in resumed.output, resumed.output
    bad = CliRunner().invoke(app, ["run", "baseline", "--executor", "cloud"], env=env)
    assert bad.exit_code == 2 and "unknown executor" in bad.output


def test_sharding_makes_one_job_per_method_and_listed_value() -> None:
    profile = {"name": "suite", "shards": {"dataset": ["cifar10", "stl10"]}}
    jobs = shard_jobs(["fare", "tecoa"], profile, "dataset", {"n_test": 10}, force=True)
    assert [(j.method, j.profile, j.overrides, j.force) for j in jobs] == [
        ("fare", "suite", {"n_test": 10, "dataset": "cifar10"}, True),
        ("fare", "suite", {"n_test": 10, "dataset": "stl10"}, True),
        ("tecoa", "suite", {"n_test": 10, "dataset": "cifar10"}, True),
        ("tecoa", "suite", {"n_test": 10, "dataset": "stl10"}, True),
    ]
    with pytest.raises(ValueError, match=r"no shards for 'seed'.*known: dataset"):
        shard_jobs(["fare"], profile, "seed")


def test_the_cli_refuses_shards_a_profile_does_not_list() -> None:
    from typer.testing import CliRunner

    from vlmdefense.cli import app

    result = CliRunner().invoke(app, ["run", "baseline", "--executor", "local", "--shard-by", "dataset"])
    assert result.exit_code == 2 and "lists no shards for 'dataset'" in result.output
    result = CliRunner().invoke(app, ["run", "baseline", "--shard-by", "dataset"])
    assert result.exit_code == 2 and "--executor local or slurm" in result.output
