"""nc_jax.records (the one run-record reader) and the workdir lock: torn lines, bad lines, the TPT rule."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nc_jax import records
from nc_jax.training import workdir as workdir_lib


def write_lines(path, *lines):
  path.write_text("".join(lines))
  return path


def record(epoch, **values):
  return json.dumps({"epoch": epoch, **values}) + "\n"


def test_reads_records_and_the_tpt_rule(tmp_path):
  path = write_lines(tmp_path / "metrics.jsonl", record(1, tpt_start_epoch=-1, test_acc=0.5),
                     record(5, tpt_start_epoch=4, test_acc=0.7), record(9, tpt_start_epoch=4, test_acc=0.8))
  run = records.read(path)
  assert [r["epoch"] for r in run] == [1, 5, 9]
  assert records.tpt_start(run) == 4
  assert records.first_in_tpt(run)["epoch"] == 5
  assert records.tpt_start(run[:1]) is None and records.first_in_tpt(run[:1]) is None
  assert records.read(tmp_path) == run  # a run directory reads the same
  assert records.read(tmp_path / "absent.jsonl") == []


def test_torn_last_line_is_dropped_with_a_warning_and_repaired(tmp_path):
  whole = record(1, nc1=0.5) + record(2, nc1=0.4)
  path = write_lines(tmp_path / "metrics.jsonl", whole, '{"epoch": 3, "nc1": 0.')
  warnings = []
  assert [r["epoch"] for r in records.read(path, warn=warnings.append)] == [1, 2]
  assert str(path) in warnings[0] and "torn" in warnings[0]
  assert path.read_text().endswith("0.")  # reading alone changes nothing
  records.read(path, repair=True, warn=warnings.append)
  assert path.read_text() == whole
  # A torn line that a later append newline-terminated is the same fault.
  write_lines(path, whole, '{"epoch": 3, "nc1"\n')
  assert [r["epoch"] for r in records.read(path, warn=warnings.append)] == [1, 2]


def test_a_bad_line_before_the_last_names_file_and_line(tmp_path):
  path = write_lines(tmp_path / "metrics.jsonl", record(1), "not json\n", record(2))
  with pytest.raises(records.RecordsError, match=r"metrics.jsonl, line 2: not a JSON record"):
    records.read(path)


def test_interleaved_records_of_two_runs_are_refused(tmp_path):
  path = write_lines(tmp_path / "metrics.jsonl", record(1), record(2), record(1), record(2))
  with pytest.raises(records.RecordsError, match=r"line 3: epoch 1 follows epoch 2 \(two runs"):
    records.read(path)
  with pytest.raises(records.RecordsError, match="integer 'epoch'"):
    records.read(write_lines(tmp_path / "m2.jsonl", '{"nc1": 1}\n'))


def test_append_writes_whole_lines_and_non_finite_values_as_strings(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records.append(path, {"epoch": 1, "nc1": float("nan"), "count": 3})
  records.append(path, {"epoch": 2, "nc1": float("inf"), "count": 4})
  lines = path.read_text().splitlines()
  assert json.loads(lines[0]) == {"epoch": 1, "nc1": "nan", "count": 3}
  assert records.number(records.read(path)[1]["nc1"]) is None and records.number("0.25", invert=True) == 0.75


def test_finished_and_a_damaged_config(tmp_path):
  write_lines(tmp_path / "metrics.jsonl", record(1), record(4))
  (tmp_path / "config.json").write_text(json.dumps({"num_epochs": 4}))
  assert records.finished(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"num_epochs": 5}))
  assert not records.finished(tmp_path)
  (tmp_path / "config.json").write_text("{half")
  with pytest.raises(records.RecordsError, match="config.json: not JSON"):
    records.read_config(tmp_path)


def test_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
  with workdir_lib.Lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another run \(pid {os.getpid()} on host"):
      with workdir_lib.Lock(tmp_path):
        pass
  with workdir_lib.Lock(tmp_path):  # released on exit
    pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from nc_jax.training.workdir import Lock\n"
      f"lock = Lock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(60)")],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirError, match=f"pid {holder.pid}"):
    workdir_lib.Lock(tmp_path).__enter__()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  deadline = time.time() + 10
  while True:
    try:
      lock = workdir_lib.Lock(tmp_path).__enter__()
      break
    except workdir_lib.WorkdirError:
      assert time.time() < deadline
      time.sleep(0.05)
  assert lock.previous_holder["pid"] == holder.pid
  lock.__exit__(None, None, None)


def test_workdir_that_is_a_file_or_read_only_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    workdir_lib.check_usable(tmp_path / "file" / "run")
  if os.geteuid() != 0:  # root writes anywhere
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    with pytest.raises(workdir_lib.WorkdirError, match="not writable"):
      workdir_lib.check_usable(read_only / "run")
