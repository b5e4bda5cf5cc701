"""benchmarks/reproduce.py, the reproduction queue, rehearsed on the CPU.

The queue's decisions (finished, out of time, does not fit, resume, results) are what is tested; the trainer
it launches is the default config's smoke MLP (``train_command`` replaced), since a conv-net cell takes minutes
on this CPU. The conv-net cells themselves were rehearsed by hand (``--smoke``; see README, "On an accelerator").
"""

import importlib.util
import json
import sys

import pytest

from tests.run_helpers import REPO

spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


@pytest.mark.parametrize("arrivals, expected", [
    ([(1, 10.0), (2, 11.0), (3, 12.0)], None),  # two epochs after the first: not yet
    ([(1, 10.0), (2, 11.0), (3, 12.0), (4, 13.0)], (1.0, 10.0 + 350 * 1.0)),
    ([(1, 10.0), (2, 11.0), (3, 15.0), (4, 16.0), (5, 17.0)], (1.0, 360.0)),  # a measured epoch: the median
    ([(121, 8.0), (122, 8.5), (124, 9.5), (125, 10.0)], (0.5, 8.0 + 350 * 0.5)),  # resumed; a skipped line
])
def test_the_whole_run_is_projected_from_the_first_epoch_and_the_median_pace(arrivals, expected):
  got = reproduce.projected_whole_run(arrivals, 350)
  assert got == (pytest.approx(expected) if expected else None)


@pytest.fixture
def queue(tmp_path, monkeypatch):
  """main() on one cell (mnist_resnet18) whose training is the smoke MLP for ``epochs`` epochs."""
  for name in ("mnist", "fashion_mnist"):
    (tmp_path / "data" / name).mkdir(parents=True)
    for file in reproduce.IDX_FILES:
      (tmp_path / "data" / name / file).write_bytes(b"")

  def call(epochs: int, budget: int, call_seconds: int = 0):
    monkeypatch.setattr(reproduce, "SMOKE_EPOCHS", epochs)
    monkeypatch.setattr(reproduce, "train_command", lambda cell, args, workdir: [
        sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs" / "default.py:smoke"),
        "--workdir", str(workdir), f"--config.num_epochs={epochs}", "--config.measure_epochs=(1,)",
        "--config.checkpoint_every_epochs=1", "--config.per_class=20", "--config.eval_batch_size=200"])
    argv = ["--budget", str(budget), "--smoke", "--cells", "mnist_resnet18", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "out")] + (["--call-seconds", str(call_seconds)] if call_seconds else [])
    return reproduce.main(argv)
  return call, tmp_path / "out"


def test_a_finished_cell_lands_with_its_report_and_row_and_is_not_run_again(queue, capsys):
  call, out = queue
  assert call(epochs=3, budget=300) == 0
  cell = out / "mnist_resnet18"
  assert {p.name for p in cell.iterdir()} >= {"config.json", "metrics.jsonl", "report"}
  assert not list(cell.glob("checkpoints"))  # a whole run's records come back, not its checkpoints
  assert (cell / "report" / "table1.md").exists()
  rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| mnist_resnet18")]
  assert len(rows) == 1
  entry = json.loads((out / "queue.json").read_text())["devices"]["cpu (smoke)"]["mnist_resnet18"]
  assert entry["fits"] is True and entry["num_epochs"] == 3
  capsys.readouterr()
  assert call(epochs=3, budget=300) == 0 and "training" not in capsys.readouterr().out  # done: nothing to run


@pytest.mark.slow
def test_a_call_that_runs_out_of_time_checkpoints_and_the_next_resumes_or_on_a_fresh_machine_restarts(queue):
  call, out = queue
  # far more epochs than the budget allows, but a projected whole run within the call's seconds: it is stopped
  # by the deadline (SIGTERM: checkpointed), which is progress
  assert call(epochs=20000, budget=40, call_seconds=10 ** 6) == 3
  log = out / "work" / "mnist_resnet18.log"
  assert "stopped by SIGTERM" in log.read_text()
  checkpoints = out / "work" / "mnist_resnet18" / "checkpoints"
  first = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert first >= 1 and not (out / "mnist_resnet18").exists()  # nothing partial lands as a result
  assert call(epochs=20000, budget=40, call_seconds=10 ** 6) == 3  # the same machine: it resumes
  assert f"resumed from the checkpoint of epoch {first}" in log.read_text()
  import shutil
  shutil.rmtree(out / "work")  # a fresh device: the work folder is gone, the cell starts again
  assert call(epochs=20000, budget=40, call_seconds=10 ** 6) == 3
  assert "resumed" not in (out / "work" / "mnist_resnet18.log").read_text()


@pytest.mark.slow
def test_a_cell_whose_projection_exceeds_a_call_is_marked_and_skipped_after(queue, capsys):
  call, out = queue
  # measured not to fit and stopped: with no other cell, the queue is done (0); a later call goes past it
  assert call(epochs=20000, budget=60, call_seconds=30) == 0
  entry = json.loads((out / "queue.json").read_text())["devices"]["cpu (smoke)"]["mnist_resnet18"]
  assert entry["fits"] is False and entry["projected_seconds"] > 20 and entry["call_seconds"] == 30
  assert "Measured not to fit one call" in (out / "results.md").read_text()
  capsys.readouterr()
  assert call(epochs=20000, budget=60, call_seconds=30) == 0
  assert "does not fit a 30 s call" in capsys.readouterr().out
  assert call(epochs=20000, budget=60, call_seconds=60) == 0  # a longer call tries it again (and measures it)
  entry = json.loads((out / "queue.json").read_text())["devices"]["cpu (smoke)"]["mnist_resnet18"]
  assert entry["call_seconds"] == 60
