"""Every CLI's output paths and old run directories: nc_jax.report, experiments/grid.py and the
benchmarks turn OS errors into one line naming the path and the fix and leave no partial file; the readers
accept the config.json files of the committed runs under results/, written before today's keys existed."""

import errno
import json
import os
import pathlib
import shutil
import sys

import pytest

from experiments import grid
from nc_jax import files, records, report, schema

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
OLD_RUN = RESULTS / "mnist1d" / "w512_d3"  # its config.json predates streaming, the variants and resume_from
sys.path.insert(0, str(REPO / "benchmarks"))
import common as benchmarks_common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def committed_configs():
  return sorted(path for path in RESULTS.rglob("config.json") if "checkpoints" not in path.parts)


def test_every_committed_config_is_read_with_todays_defaults_for_the_keys_it_lacks():
  configs = committed_configs()
  assert len(configs) >= 10
  today = json.loads(schema.base_config(dataset="mnist1d", data_source="generated", model="mlp").to_json())
  for path in configs:
    stored = json.loads(path.read_text())
    read = records.read_config(path.parent)
    assert set(read) >= set(today), path  # every key today's trainer has
    assert {key: read[key] for key in stored if key != "model_options"} == {
        key: value for key, value in stored.items() if key != "model_options"}, path  # stored values kept
    assert read["model_options"].items() >= stored["model_options"].items(), path  # options: defaults added
  old = records.read_config(OLD_RUN)
  assert "input_pipeline" not in json.loads((OLD_RUN / "config.json").read_text())
  assert old["input_pipeline"] == today["input_pipeline"] and old["optimizer"] == today["optimizer"]


def test_report_and_grid_select_read_the_committed_runs(tmp_path, capsys):
  run = report.load_run(str(OLD_RUN))
  assert run.name == "mnist1d / mlp (depth 3, width 512), lr 0.0679" and run.records[-1]["epoch"] == 350
  root = tmp_path / "fashion_mnist"
  shutil.copytree(RESULTS / "fashion_mnist" / "fashion_mnist_mlp", root / "fashion_mnist_mlp",
                  ignore=shutil.ignore_patterns("report", "checkpoints"))
  assert grid.main(["select", "--root", str(root)]) == 0
  chosen = json.loads((root / "selection.json").read_text())["fashion_mnist_mlp"]
  committed = json.loads((RESULTS / "fashion_mnist" / "selection.json").read_text())["fashion_mnist_mlp"]
  assert chosen["lr"] == committed["lr"] and chosen["finished_runs"] == 3
  assert chosen["final_test_acc"] == committed["final_test_acc"]


def error_line(capsys) -> str:
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
  return err[0]


def leftovers(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_report_os_errors_are_one_line_naming_the_path_and_leave_no_partial_file(tmp_path, capsys, monkeypatch):
  run = str(OLD_RUN)
  (tmp_path / "file").write_text("x")
  assert report.main([run, "--out", str(tmp_path / "file")]) == 1  # was a FileExistsError traceback
  assert f"cannot write {tmp_path / 'file'}: File exists; --out must be a folder" in error_line(capsys)
  assert report.main([run, "--out", str(tmp_path / "file" / "below")]) == 1
  assert "Not a directory; --out must be a folder" in error_line(capsys)

  blocked = tmp_path / "blocked"
  (blocked / "fig1_train_error.png").mkdir(parents=True)  # a folder where the first figure goes
  assert report.main([run, "--out", str(blocked)]) == 1
  assert f"cannot write {blocked / 'fig1_train_error.png'}: Is a directory" in error_line(capsys)
  assert leftovers(blocked) == ["fig1_train_error.png"]

  real_fsync = os.fsync
  def disk_full(descriptor):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(files.os, "fsync", disk_full)  # every write reaches the disk, then the disk is full
  full = tmp_path / "full"
  assert report.main([run, "--out", str(full)]) == 1
  line = error_line(capsys)
  assert f"cannot write {full / 'fig1_train_error.png'}: No space left on device; free space" in line, line
  assert leftovers(full) == [], "no 0-byte PNG, no temporary file"
  monkeypatch.setattr(files.os, "fsync", real_fsync)

  def read_only(path, mode="r", *args, **kwargs):  # chmod does not stop root: the refusal a read-only mount gives
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  monkeypatch.setattr(files, "open", read_only, raising=False)
  assert report.main([run, "--out", str(tmp_path / "ro")]) == 1
  assert "Read-only file system; pass a --out on a writable disk" in error_line(capsys)
  monkeypatch.undo()
  assert report.main([run, "--out", str(tmp_path / "good")]) == 0
  assert "report.md" in leftovers(tmp_path / "good") and not [n for n in leftovers(tmp_path / "good") if ".tmp" in n]


def test_grid_select_os_errors_are_one_line(tmp_path, capsys):
  root = tmp_path / "root"
  shutil.copytree(OLD_RUN, root / "mnist1d" / "lr_0.0679")
  (root / "selection.json").mkdir()  # a folder where the selection goes
  assert grid.main(["select", "--root", str(root)]) == 1
  assert f"cannot write {root / 'selection.json'}: Is a directory" in error_line(capsys)


def test_a_benchmark_table_is_appended_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
  log = tmp_path / "BENCHMARKS.md"
  benchmarks_common.report("| a |\n| 1 |", append=True, path=log)
  before = log.read_text()
  assert before.startswith("# Benchmarks") and before.endswith("| a |\n| 1 |\n\n")
  monkeypatch.setattr(files.os, "fsync", lambda descriptor: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
  with pytest.raises(SystemExit) as exit_:
    benchmarks_common.report("| b |\n| 2 |", append=True, path=log)
  assert exit_.value.code == 1 and log.read_text() == before and leftovers(tmp_path) == ["BENCHMARKS.md"]
  line = error_line(capsys)
  assert str(log) in line and "pass --no-append" in line
