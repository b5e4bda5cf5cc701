"""benchmarks/accelerator.sh: every stage has a budget, and a command that cannot progress says so once.

The stages' programs are replaced by a stub Python (``PYTHON=stub``: exits at once with a chosen status), so
these tests check the script's budgeting and exit statuses in well under a second each, not the stages.
"""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.sh"


@pytest.fixture
def folders(tmp_path):
  mnist = tmp_path / "mnist"
  mnist.mkdir()
  (mnist / "train-images-idx3-ubyte.gz").write_bytes(b"")  # the script only checks that the files are there
  return mnist, tmp_path / "out"


def run(mnist, out, *arguments, status=0):
  """The script with a stub Python that exits with ``status`` for every stage."""
  stub = out.parent / "stub_python"
  stub.write_text(f"#!/bin/sh\nexit {status}\n")
  stub.chmod(0o755)
  return subprocess.run(["bash", str(SCRIPT), "--mnist", str(mnist), "--out", str(out), *arguments],
                        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": str(stub)})


@pytest.mark.parametrize("mode,budget,smallest", [([], 20, 30), (["--smoke"], 5, 10)])
def test_a_budget_below_every_stage_is_refused_once_naming_the_budget_that_works(folders, mode, budget, smallest):
  """`--budget 20` used to spend itself on the unbudgeted env stage, skip everything and exit 3 ("run the same
  command again") on every call. Now no stage starts, nothing is written, and the exit status is 4 with the
  smallest budget that lets a stage start, on every call alike."""
  mnist, out = folders
  for _ in range(2):
    result = run(mnist, out, *mode, "--budget", str(budget))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"rerun with --budget {smallest} or more" in result.stdout and "run the same command" not in result.stdout
  assert not (out / "env.txt").exists() and not list(out.glob("*.done"))


def test_stages_within_the_budget_run_then_a_stage_that_cannot_fit_is_named(folders):
  mnist, out = folders
  (out / "mnist_resnet18").mkdir(parents=True)
  (out / "mnist_resnet18" / "metrics.jsonl").write_text("")  # as if the run had measured an epoch
  result = run(mnist, out, "--smoke", "--budget", "100")  # env, train, report, metrics fit; mnist needs 135
  assert result.returncode == 3 and "run the same command again" in result.stdout, result.stdout
  assert sorted(p.stem for p in out.glob("*.done")) == ["env", "metrics", "train"]  # report: redone after mnist
  result = run(mnist, out, "--smoke", "--budget", "100")  # only the report (15 s) can start: still progress
  assert result.returncode == 3, result.stdout
  (out / "mnist_resnet18" / "metrics.jsonl").unlink()
  result = run(mnist, out, "--smoke", "--budget", "100")
  assert result.returncode == 4 and "mnist 135s" in result.stdout and "--budget 135 or more" in result.stdout
  result = run(mnist, out, "--smoke", "--budget", "200")
  assert result.returncode == 3 and (out / "mnist.done").exists(), result.stdout  # the report needs the run's records
  (out / "mnist_resnet18" / "metrics.jsonl").write_text("")
  result = run(mnist, out, "--smoke", "--budget", "200")
  assert result.returncode == 0 and (out / "report.done").exists(), result.stdout
  result = run(mnist, out, "--smoke", "--budget", "0")
  assert result.returncode == 0 and "every stage is done" in result.stdout


def test_a_failing_stage_is_named_with_its_log_and_exit_1(folders):
  mnist, out = folders
  result = run(mnist, out, "--smoke", "--budget", "100", status=7)
  assert result.returncode == 1 and "train (exit 7, log: " in result.stdout, result.stdout
  assert (out / "env.done").exists()  # env records a failed bf16 check; it is not a failure of the stage


def test_bad_arguments_exit_2(folders):
  mnist, out = folders
  assert run(mnist, out, "--budget", "abc").returncode == 2
  (out.parent / "file").write_text("")
  result = run(mnist, out.parent / "file", "--budget", "100")
  assert result.returncode == 2 and "pass a writable --out" in result.stdout
