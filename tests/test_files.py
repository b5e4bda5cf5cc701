"""nc_jax.files: a file is replaced whole and durably or left as it was, and a failure names the real path."""

import errno
import os
import stat

import pytest

from nc_jax import files


def test_a_write_replaces_the_file_whole_and_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  path.write_bytes(b"old")
  synced = []
  real_fsync = os.fsync

  def fsync(descriptor):
    synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
    real_fsync(descriptor)

  monkeypatch.setattr(files.os, "fsync", fsync)
  files.write_atomically(path, b"new")
  assert path.read_bytes() == b"new"
  assert synced == ["file", "folder"]  # the bytes before the rename, the rename after it
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_write_leaves_the_old_file_no_temporary_and_names_the_path(tmp_path, monkeypatch, failing):
  path = tmp_path / "table1.md"
  path.write_bytes(b"old")

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  if failing == "fsync":
    monkeypatch.setattr(files.os, "fsync", full)
  else:
    monkeypatch.setattr(files, "open", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(files.temporary_path(path)))), raising=False)
  with pytest.raises(OSError) as error:
    files.write_atomically(path, b"new")
  assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)  # not the temporary file's name
  assert path.read_bytes() == b"old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.md"]
  assert files.describe_write_error(error.value) == (
      f"cannot write {path}: No space left on device; free space on that disk or pass another --out")


def test_a_folder_that_refuses_fsync_still_gets_the_file(tmp_path, monkeypatch):
  real_fsync = os.fsync

  def no_folder_sync(descriptor):  # some network and FUSE mounts answer EINVAL for a folder
    if stat.S_ISDIR(os.fstat(descriptor).st_mode):
      raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    real_fsync(descriptor)

  monkeypatch.setattr(files.os, "fsync", no_folder_sync)
  files.write_atomically(tmp_path / "nc.json", b"{}\n")
  assert (tmp_path / "nc.json").read_bytes() == b"{}\n"


def test_a_missing_folder_is_an_error_naming_the_file(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    files.write_atomically(tmp_path / "absent" / "x.json", b"{}")
  assert error.value.filename == str(tmp_path / "absent" / "x.json")


def test_one_description_serves_a_read_and_a_write_under_the_chosen_folder(tmp_path):
  full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "nc.json"))
  assert files.describe_os_error(full) == f"No space left on device ({tmp_path / 'out' / 'nc.json'})"
  assert files.describe_os_error(full, "--out", under=str(tmp_path / "out")) == (
      f"cannot write {tmp_path / 'out' / 'nc.json'}: No space left on device; free space on that disk or pass "
      "another --out")
  unreadable = OSError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "config.json"))
  assert files.describe_os_error(unreadable, "--out", under=str(tmp_path / "out")) == (  # a read: no write advice
      f"Permission denied ({tmp_path / 'run' / 'config.json'})")
  assert files.describe_os_error(OSError(errno.EROFS, "Read-only file system"), "--root") == (
      "cannot write the output: Read-only file system; pass a --root on a writable disk")
  assert files.describe_os_error(OSError("the disk\n  went away")) == "the disk went away"


def test_the_os_error_behind_a_chain_of_causes_is_found_and_a_cycle_ends():
  disk = OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl")
  try:
    try:
      raise disk
    except OSError as error:
      raise RuntimeError("save failed") from error
  except RuntimeError as wrapped:
    outer = wrapped
  assert files.error_chain(outer) == [outer, disk]
  assert files.os_error(outer) is disk
  first, second = ValueError("a"), ValueError("b")
  first.__context__, second.__context__ = second, first  # a cycle: each once, then stop
  assert files.error_chain(first) == [first, second] and files.os_error(first) is None
