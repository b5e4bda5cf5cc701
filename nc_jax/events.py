"""TensorBoard event files of a run's measurements, so that a sweep can be watched live: ``tensorboard --logdir DIR``.

What is written. Every record of a run's metrics.jsonl becomes one ``Event`` at ``step`` = the record's epoch,
holding a ``Summary`` with one scalar (``simple_value``: float32, TensorBoard's scalar) per numeric key, tagged
by the key (``layer/<name>/nc1`` groups under ``layer/<name>``): ints, floats, and the strings 'nan', 'inf'
and '-inf' that ``records.plain`` writes for non-finite floats, which are written as NaN and +-inf (TensorBoard
marks them; a NaN metric is a finding, not a gap). 'epoch' itself (the step), other strings, booleans, lists
and dicts are left out. The files are in the run's own workdir, so ``tensorboard --logdir runs/`` shows every
run and every population member (``runs/cell/lr_0.01``) as a run of its own. Each process that writes opens
one new file, ``events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`` (names sort in the order they were
opened, as TensorBoard reads them), and each event is flushed and fsynced before ``write`` returns: a run
killed right after a record keeps that record's event.

The resume rule: when a run's process opens its events (``RunEvents``), TensorBoard is made to show exactly
the records the run holds then (metrics.jsonl as reconciled with the checkpoint resumed), and from then on the
records appended. What the earlier files show is read back (``shown``, applying both of TensorBoard's rules
below); at the first step s where it differs from the records (a stale point after the checkpoint, a missing
or changed one), the new file starts with a ``SessionLog.START`` event at step s (tensorboardX's ``purge_step``
marker) when the earlier files show anything at or after s, then the records from s on are written again. The
two loaders TensorBoard has:
  - the Python loader (``--load_fast=false``): a START event at step s hides every point of every tag at a
    step >= s read before it (for files of version ``brain.Event:2``, which every file here declares);
  - the Rust data server (the default where ``tensorboard-data-server`` is installed): it ignores START, and
    a point at step s hides the earlier points of its tag at steps >= s.
Under either, each epoch then shows once, with its newest value. The data server shows a stale point until
the re-measured one of its tag arrives (bit for bit the same value on one machine), and keeps a stale tag that
the run no longer writes (a run discarded with --overwrite under another config): remove the old
``events.out.tfevents.*`` files of such a workdir, or restart TensorBoard with ``--load_fast=false``.

Faults. A failed write (a full disk, a read-only or unwritable folder, a file in the way) or an unreadable
earlier file never stops training and never touches metrics.jsonl: one line is logged and this process writes
no more events; the next process to open the run writes what is missing (the rule above). A torn or damaged
earlier file is read up to its first bad record (both CRCs checked), as TensorBoard reads it.

The writer is synchronous and ours; tensorboardX provides the format (its ``Event`` / ``Summary`` protos and the
TFRecord CRC). Its ``SummaryWriter`` does not fit a run that may be killed at any moment (tensorboardX 2.6.5,
measured here): ``flush()`` does not wait for the events its background thread has not yet taken from its queue
(in one trial, 44 of 200 add-then-flush calls left the file as it was); once that thread has died of a write
error (a full disk), its queue (10 events) fills and the next ``add_scalar`` blocks forever; and two writers
opened in the same second in one folder get one file name, the second truncating the first.
"""

from __future__ import annotations

import array
import errno
import math
import numbers
import os
import pathlib
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Optional

from google.protobuf.message import DecodeError
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from nc_jax import files

FILE_PATTERN = "events.out.tfevents.*"  # TensorBoard reads every file whose name holds 'tfevents'
FILE_VERSION = "brain.Event:2"  # the version whose START events purge (TensorBoard's Python loader)
NON_FINITE = ("nan", "inf", "-inf")  # how records.plain writes non-finite floats


def scalars(record: Mapping) -> dict[str, float]:
  """The numeric values of a record by key, as TensorBoard gets them (NaN and +-inf kept); 'epoch' (the step),
  other strings, booleans, lists and dicts left out."""
  values = {}
  for key, value in record.items():
    if key == "epoch" or isinstance(value, bool):
      continue
    if isinstance(value, str) and value in NON_FINITE:
      values[key] = float(value)
    elif isinstance(value, numbers.Real):
      try:
        values[key] = float(value)
      except OverflowError:  # an int past float's range
        values[key] = math.copysign(math.inf, value)
  return values


def event_of(record: Mapping) -> event_pb2.Event:
  """A record's Event, stamped now: step = its epoch, one simple_value per numeric key (``scalars``)."""
  summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                       for tag, value in scalars(record).items()])
  return event_pb2.Event(wall_time=time.time(), step=int(record["epoch"]), summary=summary)


def purge_event(step: int) -> event_pb2.Event:
  """The marker that hides every earlier point at a step >= ``step`` (tensorboardX's ``purge_step``)."""
  return event_pb2.Event(wall_time=time.time(), step=step,
                         session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))


def frame(payload: bytes) -> bytes:
  """One TFRecord: u64 length, u32 masked CRC-32C of the length, the payload, u32 masked CRC-32C of it."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


def read_file(path) -> Iterator[event_pb2.Event]:
  """The events of one file, up to its end or its first torn, damaged or undecodable record."""
  data = pathlib.Path(path).read_bytes()
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    end = offset + 12 + length + 4
    if struct.unpack("<I", data[offset + 8:offset + 12])[0] != masked_crc32c(header) or end > len(data):
      return
    payload = data[offset + 12:end - 4]
    if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
      return
    try:
      event = event_pb2.Event.FromString(payload)
    except DecodeError:  # not an Event: nothing after it is read either
      return
    yield event
    offset = end


def event_files(directory) -> list[pathlib.Path]:
  """The event files of a run's directory, in the order TensorBoard reads them (by name)."""
  return sorted(p for p in pathlib.Path(directory).glob(FILE_PATTERN) if p.is_file())


def shown(directory) -> dict[int, dict[str, float]]:
  """What TensorBoard shows of a directory's event files, step -> {tag: value}: the files read in name order, a
  START event at step s dropping every point at a step >= s, and a point dropping the earlier points of its
  tag at steps >= its own (the Python loader's rule and the data server's, together; see the module's
  docstring)."""
  points: dict[int, dict[str, float]] = {}
  for path in event_files(directory):
    try:
      events = list(read_file(path))
    except OSError:  # unreadable: TensorBoard skips it too
      continue
    for event in events:
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        points = {step: tags for step, tags in points.items() if step < event.step}
      if event.HasField("summary"):
        later = [step for step in points if step >= event.step]  # usually none: steps increase
        for value in event.summary.value:
          if value.WhichOneof("value") != "simple_value":
            continue
          for step in later:
            points[step].pop(value.tag, None)
          points.setdefault(event.step, {})[value.tag] = value.simple_value
  return {step: tags for step, tags in sorted(points.items()) if tags}


def _same(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
  """Equal as TensorBoard holds them: the same tags, each value equal in float32 (NaN equals NaN)."""
  if a.keys() != b.keys():
    return False
  for key in a:
    x, y = array.array("f", [a[key], b[key]])
    if x != y and not (math.isnan(x) and math.isnan(y)):
      return False
  return True


class RunEvents:
  """The TensorBoard events of one run's directory, written as its records are appended (module docstring).

  ``RunEvents(directory, records)`` makes TensorBoard show exactly ``records`` (the run's so far: its
  metrics.jsonl after resuming), writing only where the earlier files differ; ``write(record)`` adds each new
  record. ``enabled=False`` (config.tensorboard) reads and writes nothing. A failure is logged once and ends the
  writing (``log``: the trainer's); nothing here raises an OSError.
  """

  def __init__(self, directory, records: Sequence[Mapping] = (), *, enabled: bool = True,
               log: Callable[[str], None] = print):
    self.directory = pathlib.Path(directory)
    self.log = log
    self.path: Optional[pathlib.Path] = None
    self._descriptor: Optional[int] = None
    self.failed = not enabled
    if enabled:
      self._guarded(self._catch_up, records)

  def __enter__(self) -> "RunEvents":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write(self, record: Mapping) -> None:
    """Appends the record's event (flushed and fsynced); after a failure, nothing."""
    if not self.failed:
      self._guarded(self._append, [event_of(record)])

  def close(self) -> None:
    if self._descriptor is not None:
      descriptor, self._descriptor = self._descriptor, None
      try:
        os.close(descriptor)
      except OSError:
        pass

  # ------------------------------------------------------------------ internals

  def _guarded(self, action, argument) -> None:
    try:
      action(argument)
    except OSError as error:
      self.failed = True
      self.close()
      self.log(f"WARNING: TensorBoard events of {self.directory} not written ({files.describe_os_error(error)}); "
               "training goes on and metrics.jsonl is as it was (the next start writes what is missing)")

  def _catch_up(self, records: Sequence[Mapping]) -> None:
    """Writes what TensorBoard must show differently to show exactly ``records`` (the resume rule)."""
    on_screen = shown(self.directory)
    wanted = {int(r["epoch"]): scalars(r) for r in records}
    differ = [s for s in sorted(set(on_screen) | set(wanted)) if not _same(on_screen.get(s, {}), wanted.get(s, {}))]
    if not differ:
      return
    first = differ[0]
    events = [purge_event(first)] if any(s >= first for s in on_screen) else []
    self._append(events + [event_of(r) for r in records if int(r["epoch"]) >= first])

  def _append(self, events: Sequence[event_pb2.Event]) -> None:
    if not events:
      return
    if self._descriptor is None:
      self._open()
    data = b"".join(frame(e.SerializeToString()) for e in events)
    written = os.write(self._descriptor, data)
    if written != len(data):
      raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes); the disk may be full",
                    str(self.path))
    os.fsync(self._descriptor)

  def _open(self) -> None:
    """A new file of this process (never an earlier one: TensorBoard reads each file once, in name order)."""
    stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    for n in range(1000):
      path = self.directory / f"{stem}.{n:03d}"
      try:
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
      except FileExistsError:
        continue
      self.path = path
      header = event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION)
      self._append([header])
      return
    raise OSError(errno.EEXIST, "no free event file name", str(self.directory / stem))


__all__ = ["FILE_PATTERN", "RunEvents", "event_files", "event_of", "frame", "purge_event", "read_file", "scalars",
           "shown"]
