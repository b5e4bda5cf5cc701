"""TensorBoard events (nc_jax.events): every run and every population member shows in TensorBoard exactly what its
metrics.jsonl holds, each epoch once after a resume, and a failing events file never stops a run.

The events are read back here with a reader of the test's own (TFRecord framing and CRC-32C from their
definitions, the Event proto from tensorboardX), not with nc_jax.events' reader nor TensorFlow, and shown as
TensorBoard's two loaders show them:
  - the Python loader: a SessionLog.START event at step s (tensorboardX's purge_step marker) hides every point
    at a step >= s read before it; points are otherwise kept as read (a step written twice shows twice);
  - the Rust data server: a point at step s hides the earlier points of its tag at steps >= s.
"""

import errno
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from nc_jax import events as events_lib, records
from nc_jax.training import loop, population, population_disk, workdir as workdir_lib
from nc_jax.training.loop import train_and_evaluate
from tests.run_helpers import QUIET
from tests.test_population import tiny

LRS = (0.01, 0.1)


# ----------------------------------------------------------------------------- the test's own reader

def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli: reflected polynomial 0x82F63B78), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
  """TFRecord's mask: the CRC rotated right by 15 bits plus 0xa282ead8 (mod 2^32)."""
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
  """The events of one file: each record u64 length, u32 masked CRC of the length, payload, u32 masked CRC.
  A torn last record (a write cut short) ends the file, as TensorBoard reads it."""
  data, offset, out = path.read_bytes(), 0, []
  while offset + 12 <= len(data) and offset + 16 + struct.unpack("<Q", data[offset:offset + 8])[0] <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked(crc32c(header)), path
    payload = data[offset + 12:offset + 12 + length]
    assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == masked(crc32c(payload)), path
    out.append(event_pb2.Event.FromString(payload))
    offset += 16 + length
  return out


def events_of(directory):
  """Every event of a run directory, its files in name order (as TensorBoard reads them)."""
  paths = sorted(directory.glob("*tfevents*"))
  return [event for path in paths for event in read_records(path)]


def python_loader(events):
  """tag -> [(step, value)] as TensorBoard's Python loader shows them (START purges; duplicates stay)."""
  assert events[0].file_version == "brain.Event:2"  # the version under which START purges
  series = {}
  for event in events:
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      series = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in series.items()}
    for value in event.summary.value:
      series.setdefault(value.tag, []).append((event.step, value.simple_value))
  return series


def data_server(events):
  """tag -> [(step, value)] as TensorBoard's data server shows them (a point preempts its tag's steps >= it)."""
  series = {}
  for event in events:
    for value in event.summary.value:
      points = [(s, v) for s, v in series.get(value.tag, []) if s < event.step]
      series[value.tag] = points + [(event.step, value.simple_value)]
  return series


def expected(run_records):
  """tag -> [(epoch, float32 value)] of every numeric key of the records ('nan'/'inf' strings as floats)."""
  series = {}
  for record in run_records:
    for key, value in record.items():
      numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
      if key != "epoch" and (numeric or value in ("nan", "inf", "-inf")):
        series.setdefault(key, []).append((record["epoch"], float(np.float32(float(value)))))
  return series


def same(a, b):
  """Equal series, NaN equal to NaN."""
  return a.keys() == b.keys() and all(
      [s for s, _ in a[k]] == [s for s, _ in b[k]]
      and all(x == y or (math.isnan(x) and math.isnan(y)) for (_, x), (_, y) in zip(a[k], b[k])) for k in a)


def assert_tensorboard_shows(directory, run_records=None):
  """Both loaders show exactly the directory's metrics.jsonl (or ``run_records``): every numeric key, every epoch
  once, values to float32."""
  want = expected(records.read(directory) if run_records is None else run_records)
  assert want, f"{directory} holds no records"
  read = events_of(directory)
  for view in (python_loader(read), data_server(read)):
    assert same(view, want), (sorted(view), sorted(want))


# ----------------------------------------------------------------------------- the writer alone

RECORDS = [{"epoch": 1, "step": 3, "nc1": 9.5, "test_acc": 0.25, "nc2": "nan", "big": "inf", "note": "x",
            "per_layer": [1.0, 2.0], "nested": {"a": 1}, "flag": True, "tpt_start_epoch": -1},
           {"epoch": 4, "step": 12, "nc1": 0.1, "test_acc": 0.5, "nc2": 0.3, "big": "-inf", "note": "y",
            "per_layer": [], "nested": {}, "flag": False, "tpt_start_epoch": 4}]


def test_numeric_keys_become_scalars_nan_and_inf_included_the_rest_left_out(tmp_path):
  assert set(events_lib.scalars(RECORDS[0])) == {"step", "nc1", "test_acc", "nc2", "big", "tpt_start_epoch"}
  with events_lib.RunEvents(tmp_path, log=QUIET["log"]) as writer:
    for record in RECORDS:
      writer.write(record)
  assert len(list(tmp_path.glob("*tfevents*"))) == 1
  assert_tensorboard_shows(tmp_path, RECORDS)
  nc2 = python_loader(events_of(tmp_path))["nc2"]
  assert math.isnan(nc2[0][1]) and nc2[1] == (4, pytest.approx(0.3))  # NaN written as NaN, not dropped


def test_config_tensorboard_false_writes_nothing(tmp_path):
  with events_lib.RunEvents(tmp_path, RECORDS[:1], enabled=False) as writer:
    writer.write(RECORDS[1])
  assert list(tmp_path.iterdir()) == []


def test_a_reopened_run_shows_its_records_once_whatever_the_earlier_files_hold(tmp_path):
  # a resume from the checkpoint of epoch 1: the earlier process's point at epoch 4 is stale
  with events_lib.RunEvents(tmp_path, log=QUIET["log"]) as writer:
    for record in RECORDS:
      writer.write(record)
  redone = {**RECORDS[1], "nc1": 0.2}  # re-measured (a value that differs, to see which one shows)
  with events_lib.RunEvents(tmp_path, RECORDS[:1], log=QUIET["log"]) as writer:
    # the Python loader hides the stale point from the moment the run resumes; the data server when the
    # re-measured one arrives
    assert same(python_loader(events_of(tmp_path)), expected(RECORDS[:1]))
    writer.write(redone)
  purges = [e.step for e in events_of(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [4]
  assert_tensorboard_shows(tmp_path, [RECORDS[0], redone])
  # opening again with what it holds writes nothing new: no file, since nothing differs
  files_before = sorted(tmp_path.glob("*tfevents*"))
  events_lib.RunEvents(tmp_path, [RECORDS[0], redone]).close()
  assert sorted(tmp_path.glob("*tfevents*")) == files_before
  # a record the earlier files lack (killed between metrics.jsonl and its event; --resume_from's carried
  # records; tensorboard turned on mid-run) is written when the run opens
  later = {**RECORDS[1], "epoch": 7}
  events_lib.RunEvents(tmp_path, [RECORDS[0], redone, later]).close()
  assert_tensorboard_shows(tmp_path, [RECORDS[0], redone, later])
  # a fresh start in a folder holding another run's events (discarded by --overwrite) hides them all
  events_lib.RunEvents(tmp_path, []).close()
  assert python_loader(events_of(tmp_path)) == {tag: [] for tag in expected(RECORDS)}


def test_a_torn_last_event_is_written_again_by_the_next_process(tmp_path):
  with events_lib.RunEvents(tmp_path) as writer:
    for record in RECORDS:
      writer.write(record)
  (path,) = tmp_path.glob("*tfevents*")
  os.truncate(path, path.stat().st_size - 3)  # killed inside the last write
  assert [e.step for e in events_of(tmp_path) if e.HasField("summary")] == [1]
  events_lib.RunEvents(tmp_path, RECORDS).close()
  assert [e.step for e in events_of(tmp_path) if e.HasField("summary")] == [1, 4]  # only what was lost
  assert_tensorboard_shows(tmp_path, RECORDS)


def test_a_full_disk_warns_once_in_one_line_and_writing_stops(tmp_path, monkeypatch):
  lines = []

  class FullDisk:
    def __getattr__(self, name):
      return getattr(os, name)

    @staticmethod
    def write(descriptor, data):
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(events_lib, "os", FullDisk())  # nc_jax.events' os only
  with events_lib.RunEvents(tmp_path, log=lines.append) as writer:
    for record in RECORDS:
      writer.write(record)
  assert len(lines) == 1 and lines[0].startswith("WARNING: TensorBoard events of") and "No space left" in lines[0]
  assert "\n" not in lines[0]


# ----------------------------------------------------------------------------- runs

def test_a_single_runs_events_are_its_metrics_jsonl(tmp_path):
  train_and_evaluate(tiny(), str(tmp_path), **QUIET)
  assert [r["epoch"] for r in records.read(tmp_path)] == [1, 3]
  assert len(list(tmp_path.glob("*tfevents*"))) == 1
  assert_tensorboard_shows(tmp_path)
  assert "nc1" in python_loader(events_of(tmp_path))


def test_every_population_member_writes_its_own_records(tmp_path):
  members = population.train_population(tiny(), LRS, workdir=tmp_path, log=QUIET["log"])
  for member in members:
    directory = tmp_path / population_disk.member_name(member.lr)
    assert records.read(directory) == member.records
    assert_tensorboard_shows(directory)
  assert not list(tmp_path.glob("population_*/*tfevents*"))  # the population's own folder is no run


def test_an_in_place_restart_shows_each_epoch_once(tmp_path):
  """``--resume_from DIR:1`` in DIR: metrics.jsonl is cut to epoch 1 and epoch 3 re-measured; the earlier
  process's point at epoch 3 is hidden (START at 3 for the Python loader, the new point for the data server)."""
  train_and_evaluate(tiny(), str(tmp_path), **QUIET)
  first = records.read(tmp_path)
  train_and_evaluate(tiny(resume_from=f"{tmp_path}:1"), str(tmp_path), overwrite=True, **QUIET)
  again = records.read(tmp_path)
  assert [r["epoch"] for r in again] == [1, 3] and again[0] == first[0]
  read = events_of(tmp_path)
  assert [e.step for e in read if e.HasField("summary")] == [1, 3, 3]  # on disk twice; shown once
  assert [e.step for e in read if e.session_log.status == event_pb2.SessionLog.START] == [3]
  assert_tensorboard_shows(tmp_path)


def test_overwrite_discards_the_earlier_runs_events_with_its_results(tmp_path):
  assert workdir_lib.EVENTS_PATTERN == events_lib.FILE_PATTERN  # the workdir module keeps a copy (no protobuf there)
  train_and_evaluate(tiny(), str(tmp_path), **QUIET)
  earlier = events_lib.event_files(tmp_path)
  train_and_evaluate(tiny(weight_decay=1e-3), str(tmp_path), overwrite=True, **QUIET)
  assert len(events_lib.event_files(tmp_path)) == 1 and not set(earlier) & set(events_lib.event_files(tmp_path))
  assert_tensorboard_shows(tmp_path)


def test_a_run_killed_between_its_checkpoint_and_its_record_gets_the_event_when_resumed(tmp_path, monkeypatch):
  class Killed(Exception):
    pass

  append = loop.append_record

  def append_then_die(path, run_records, log):
    if run_records[-1]["epoch"] == 3:
      raise Killed  # the checkpoint of epoch 3 holds the record; neither metrics.jsonl nor the events do
    append(path, run_records, log)

  monkeypatch.setattr(loop, "append_record", append_then_die)
  with pytest.raises(Killed):
    train_and_evaluate(tiny(), str(tmp_path), **QUIET)
  monkeypatch.setattr(loop, "append_record", append)
  train_and_evaluate(tiny(), str(tmp_path), **QUIET)  # already trained: the record restored from the checkpoint
  assert [r["epoch"] for r in records.read(tmp_path)] == [1, 3]
  assert_tensorboard_shows(tmp_path)


def test_config_tensorboard_false_and_an_unwritable_events_file_leave_metrics_jsonl_whole(tmp_path, monkeypatch):
  train_and_evaluate(tiny(tensorboard=False), str(tmp_path / "off"), **QUIET)
  assert len(records.read(tmp_path / "off")) == 2 and not list((tmp_path / "off").glob("*tfevents*"))

  def refuse(self):
    raise PermissionError(errno.EACCES, "Permission denied", str(self.directory / "events.out.tfevents.x"))

  monkeypatch.setattr(events_lib.RunEvents, "_open", refuse)
  lines = []
  train_and_evaluate(tiny(), str(tmp_path / "on"), log=lines.append)
  warnings = [line for line in lines if "TensorBoard" in line]
  assert len(warnings) == 1 and "Permission denied" in warnings[0]
  assert [r["epoch"] for r in records.read(tmp_path / "on")] == [1, 3]
  monkeypatch.undo()
  train_and_evaluate(tiny(), str(tmp_path / "on"), **QUIET)  # the next start writes what is missing
  assert_tensorboard_shows(tmp_path / "on")
