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
  (out / "work" / "mnist_resnet18").mkdir(parents=True)
  (out / "work" / "mnist_resnet18" / "metrics.jsonl").write_text("")  # as if the run had measured an epoch
  result = run(mnist, out, "--smoke", "--budget", "100")  # env, train, population, report, metrics fit; mnist 135
  assert result.returncode == 3 and "run the same command again" in result.stdout, result.stdout
  assert sorted(p.stem for p in out.glob("*.done")) == ["env", "metrics", "population", "train"]  # report: redone
  result = run(mnist, out, "--smoke", "--budget", "100")  # only the report (15 s) can start: still progress
  assert result.returncode == 3, result.stdout
  (out / "work" / "mnist_resnet18" / "metrics.jsonl").unlink()
  result = run(mnist, out, "--smoke", "--budget", "100")
  assert result.returncode == 4 and "mnist 135s" in result.stdout and "--budget 135 or more" in result.stdout
  result = run(mnist, out, "--smoke", "--budget", "200")
  assert result.returncode == 3 and (out / "mnist.done").exists(), result.stdout  # the report needs the run's records
  (out / "work" / "mnist_resnet18" / "metrics.jsonl").write_text("")
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


def _only_mnist_left(out):
  out.mkdir()
  for name in ("env", "train", "population", "metrics"):
    (out / f"{name}.done").write_text("")


def run_training(mnist, out, training: str, *arguments):
  """The script with a stub Python whose reproduction queue runs the shell ``training`` (then exits 124, as when timeout
  stops it at its limit: the stub only pretends to run out of time); every other stage exits 0."""
  stub = out.parent / "stub_python"
  stub.write_text('#!/bin/sh\ncase "$*" in *reproduce.py*) ' + training + "; exit 124 ;; esac\nexit 0\n")
  stub.chmod(0o755)
  return subprocess.run(["bash", str(SCRIPT), "--mnist", str(mnist), "--out", str(out), *arguments],
                        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": str(stub)})


def test_a_run_that_times_out_without_a_new_checkpoint_is_no_progress(folders):
  """A run too slow to checkpoint within its share of the budget used to get exit 3 ("run the same command
  again") on every call; it advanced nothing, so it exits 4 naming a larger budget, on every call alike."""
  mnist, out = folders
  _only_mnist_left(out)
  for _ in range(2):
    result = run_training(mnist, out, "true", "--smoke", "--budget", "140")  # 135 needed: 5 s to spare
    assert result.returncode == 4, result.stdout + result.stderr
    assert "rerun with --budget 280 or more" in result.stdout and "run the same command again" not in result.stdout


def test_a_run_that_times_out_after_a_new_checkpoint_is_progress(folders):
  mnist, out = folders
  _only_mnist_left(out)
  checkpoints = out / "work" / "mnist_resnet18" / "checkpoints"
  checkpoints.mkdir(parents=True)
  (checkpoints / "2").mkdir()
  result = run_training(mnist, out, f"mkdir -p '{checkpoints}/3'", "--smoke", "--budget", "140")
  assert result.returncode == 3 and "run the same command again" in result.stdout, result.stdout
  result = run_training(mnist, out, f"mkdir -p '{checkpoints}/3'", "--smoke", "--budget", "140")  # 3 was there
  assert result.returncode == 4, result.stdout


@pytest.mark.parametrize("budget", ["99999999999999999999", "12345678"])
def test_a_budget_of_too_many_digits_is_one_line(folders, budget):
  mnist, out = folders
  result = run(mnist, out, "--budget", budget)
  assert result.returncode == 2 and result.stderr == "" and len(result.stdout.strip().splitlines()) == 1
  assert f"--budget {budget}: must be a whole number of seconds" in result.stdout


@pytest.mark.skipif(not pathlib.Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_out_folder_is_named_in_one_line(folders, monkeypatch):
  """A full --out: every log would be empty and every stage 'fail'. The script's writes are steered into
  /dev/full (always full) through a `head` on PATH that fails as a full disk does."""
  mnist, out = folders
  fake_bin = out.parent / "bin"
  fake_bin.mkdir()
  head = fake_bin / "head"
  head.write_text("#!/bin/sh\necho 'head: error writing: No space left on device' >&2\nexit 1\n")
  head.chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  result = run(mnist, out, "--smoke", "--budget", "100")
  assert result.returncode == 1 and "Traceback" not in result.stdout, result.stdout
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and f"{out} is full" in lines[0] and "another --out" in lines[0], result.stdout
  assert not list(out.glob("*.done"))


def run_queue(mnist, out, status: int, *arguments):
  """The script with a stub Python whose reproduction queue exits with ``status``; every other stage exits 0."""
  stub = out.parent / "stub_python"
  stub.write_text('#!/bin/sh\ncase "$*" in *reproduce.py*) exit ' + str(status) + " ;; esac\nexit 0\n")
  stub.chmod(0o755)
  return subprocess.run(["bash", str(SCRIPT), "--mnist", str(mnist), "--out", str(out), *arguments],
                        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": str(stub)})


@pytest.mark.parametrize("queue_status, status", [(3, 3), (4, 4), (1, 1)])
def test_the_queues_own_verdict_is_the_calls_progress(folders, queue_status, status):
  # 3: cells left, and a cell finished, was measured not to fit or checkpointed; 4: cells left, nothing advanced
  mnist, out = folders
  _only_mnist_left(out)
  result = run_queue(mnist, out, queue_status, "--smoke", "--budget", "140")
  assert result.returncode == status, result.stdout
  assert not (out / "mnist.done").exists()
  assert ("run the same command again to go on" in result.stdout) == (status == 3)


def test_only_queue_gives_the_queue_the_whole_call(folders):
  mnist, out = folders
  result = run_queue(mnist, out, 0, "--only-queue", "--budget", "100")
  assert result.returncode == 0, result.stdout
  assert sorted(p.name for p in out.glob("*.done")) == ["mnist.done"]
  assert "env:" not in (out / "progress.log").read_text()
