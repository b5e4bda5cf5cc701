"""Population training (issue 22): K learning rates in one program give the K single runs' records."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import default as default_config
from nc_jax import collect as collect_lib, records, schema
from nc_jax.data import device
from nc_jax.training import population, population_disk, program as program_lib
from nc_jax.training import workdir as workdir_lib
from nc_jax.training.loop import train_and_evaluate
from nc_jax.training.preemption import Preempted
from tests import run_helpers
from tests.run_helpers import NOISE, QUIET

LRS = (0.01, 0.03, 0.1)
# vmap's batched matmuls and reductions round differently from the single run's (population.MEMBER_LOOPS);
# measured over 3 epochs of this config: at most 1.6e-6 relative in any key (nc1 at epoch 3; NC1 is a ratio
# of spreads, so it amplifies the params' last-bit differences). 2e-5 leaves a 10x margin.
VMAP_RTOL = 2e-5


def tiny(**overrides):
  """The smoke MLP on 40 examples per class (3 steps of 128 per epoch), 3 epochs at a constant lr, measured
  at 1 and 3; the TPT threshold low enough that members reach it at different epochs (measured: train
  accuracy 0.26 at epoch 2 with lr 0.1, 0.29 at epoch 3 with lr 0.03, 0.16 with lr 0.01)."""
  config = default_config.get_config("smoke")
  config.update(dict(num_epochs=3, per_class="40", measure_epochs=(1, 3), lr_decay_epochs=(3,), tpt_threshold=0.25,
                     **overrides))
  return config


def single_records(config, lr, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(f"single_lr{lr}")
  train_and_evaluate(population.member_config(config, lr), str(workdir), **QUIET)
  return [{k: v for k, v in r.items() if k not in NOISE} for r in records.read(workdir)]


def without_noise(member):
  return [{k: v for k, v in r.items() if k not in NOISE} for r in member.records]


@pytest.fixture(scope="module")
def one_device_singles(tmp_path_factory):
  return [single_records(tiny(num_devices=1), lr, tmp_path_factory) for lr in LRS]


@pytest.fixture(scope="module")
def eight_device_singles(tmp_path_factory):
  return [single_records(tiny(), lr, tmp_path_factory) for lr in LRS]


@pytest.mark.slow
def test_the_tiny_runs_measure_a_tpt_start_between_the_scheduled_epochs(eight_device_singles):
  # Otherwise the equality tests below would not check each member's own TPT start.
  starts = {r[-1]["tpt_start_epoch"] for r in eight_device_singles}
  assert len(starts) > 1 and 2 in {r["epoch"] for run in eight_device_singles for r in run}


@pytest.mark.slow
def test_unrolled_members_are_the_single_runs_bit_for_bit_on_one_device(one_device_singles):
  members = population.train_population(tiny(num_devices=1), LRS, member_loop="unroll", log=QUIET["log"])
  assert [m.lr for m in members] == list(LRS)
  for member, single in zip(members, one_device_singles):
    assert member.diverged is None
    assert without_noise(member) == single  # every key, tolerance 0


def assert_within_rounding(members, singles, rtol=VMAP_RTOL):
  """Each member's records (a ``Member`` or a list of records) are its single run's: integers and strings
  exactly, floats within ``rtol``."""
  for member, single in zip(members, singles, strict=True):
    got = member if isinstance(member, list) else without_noise(member)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in single]
    for mine, theirs in zip(got, single):
      assert set(mine) == set(theirs)
      for key, value in theirs.items():
        if isinstance(value, (int, str)):  # epochs, steps, TPT start, counts, 'nan': exactly
          assert mine[key] == value, key
        else:
          assert mine[key] == pytest.approx(value, rel=rtol, abs=1e-7), key


@pytest.mark.slow
def test_vmapped_members_on_eight_devices_are_the_single_runs_within_rounding(eight_device_singles):
  # K = 3 on 8 devices: gcd 1, so a (1 member, 8 data) mesh: every member data-parallel over all 8
  members = population.train_population(tiny(), LRS, member_loop="vmap", log=QUIET["log"])
  assert_within_rounding(members, eight_device_singles)


@pytest.mark.slow
def test_members_split_over_the_mesh_are_the_single_runs_within_rounding(eight_device_singles, tmp_path_factory):
  # K = 4 on 8 devices: a (4 member, 2 data) mesh, each member on its own pair of devices
  lrs = LRS + (0.02,)
  assert dict(population.population_mesh(jax.devices(), len(lrs)).shape) == {"member": 4, "data": 2}
  members = population.train_population(tiny(), lrs, member_loop="vmap", log=QUIET["log"])
  assert_within_rounding(members, eight_device_singles + [single_records(tiny(), 0.02, tmp_path_factory)])


def _collectives(compiled_text: str) -> list[tuple[str, str]]:
  """(op, result shape) of each cross-device collective in a compiled program's HLO text."""
  pattern = r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
  return [(op, shape) for shape, op in re.findall(pattern, compiled_text)]


@pytest.mark.parametrize("size, groups", [(8, 8), (4, 4), (2, 2), (3, 1), (16, 8)])
def test_members_are_split_over_the_member_axis_and_only_data_parallel_devices_talk(size, groups):
  config = tiny()
  lrs = tuple(0.01 * (k + 1) for k in range(size))
  pop = population.build_population(config, lrs, device.data_mesh(), 10, (40,), steps_per_epoch=3, num_train=400)
  assert dict(pop.mesh.shape) == {"member": groups, "data": 8 // groups}
  state = pop.init()
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding == pop.state_sharding and len(leaf.sharding.device_set) == 8
    # each device holds its group's K / M members, whole (nothing of a member split over 'data')
    assert {shard.data.shape for shard in leaf.addressable_shards} == {(size // groups, *leaf.shape[1:])}
  dataset = program_lib.load_dataset(config, "memory")
  inputs, labels = (device.put_replicated(x, pop.mesh) for x in (dataset.train_inputs, dataset.train_labels))
  compiled = jax.jit(lambda s, x, y: pop.train_epoch(s, x, y, 1)).lower(state, inputs, labels).compile().as_text()
  # members never exchange anything while training: with each member on devices of its own, the only collectives
  # are the all-gathers of the epoch's (K,) totals after the scan (every process reads them); devices sharing a
  # member's batch all-reduce its gradients and batch statistics
  collectives = _collectives(compiled)
  gathers = [(op, shape) for op, shape in collectives if op == "all-gather"]
  assert bool(gathers) == (groups > 1)  # (one member group: the totals are on every device already)
  assert all(re.fullmatch(rf"[a-z0-9]+\[{size}\]\{{0\}}", shape) for _, shape in gathers), gathers
  assert any(op == "all-reduce" for op, _ in collectives) == (groups < 8)
  state, totals = pop.train_epoch(state, inputs, labels, 1)
  assert all(leaf.sharding == pop.state_sharding for leaf in jax.tree_util.tree_leaves(state))
  assert np.asarray(state.step).tolist() == [3] * size and np.isfinite(np.asarray(totals["loss"])).all()


def test_unrolled_members_keep_one_member_group():
  assert dict(population.population_mesh(jax.devices(), 8, "unroll").shape) == {"member": 1, "data": 8}


def test_three_members_on_eight_devices_are_replicated_with_a_member_axis():
  config, mesh = tiny(), device.data_mesh()
  assert mesh.size == 8
  pop = population.build_population(config, LRS, mesh, 10, (40,), steps_per_epoch=3, num_train=400)
  state = pop.init()
  single = pop.program.abstract_state
  for leaf, one in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(single)):
    assert leaf.shape == (len(LRS), *one.shape)
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  # a member taken out is a single run's state: the shapes its checkpoints and evaluation expect
  taken = population.member(state, 1)
  assert jax.tree_util.tree_structure(taken) == jax.tree_util.tree_structure(single)
  restacked = population.stack(population.unstack(state, len(LRS)))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(restacked),
                                                  jax.tree_util.tree_leaves(state)))


def test_the_members_see_one_epoch_of_the_single_runs_batches():
  # The batch is drawn once for all members: with every lr equal, every member is the same run.
  config, mesh = tiny(), device.data_mesh()
  dataset = program_lib.load_dataset(config, "memory")
  inputs, labels = (device.put_replicated(x, mesh) for x in (dataset.train_inputs, dataset.train_labels))
  pop = population.build_population(config, (0.05, 0.05), mesh, 10, (40,), steps_per_epoch=3, num_train=400)
  state, totals = pop.train_epoch(pop.init(), inputs, labels, 1)
  assert int(totals["count"]) == 3 * 128 and totals["loss"].shape == (2,)
  for a in jax.tree_util.tree_leaves(state):
    np.testing.assert_array_equal(a[0], a[1])
  assert np.asarray(state.step).tolist() == [3, 3]


def test_a_diverging_member_stops_alone():
  members = population.train_population(tiny(), (0.03, 1e4), member_loop="vmap", log=QUIET["log"])
  healthy, diverged = members
  assert healthy.diverged is None and [r["epoch"] for r in healthy.records][-1] == 3
  assert diverged.diverged is not None and "lower its lr" in diverged.diverged
  assert all(math.isfinite(r["epoch_loss"]) for r in diverged.records)


@pytest.mark.parametrize("lrs, message", [((), "at least one learning rate"), ((0.1, -1.0), "lr -1.0"),
                                           ((0.1, float("nan")), "lr nan")])
def test_bad_learning_rates_are_refused_in_one_line(lrs, message):
  with pytest.raises(schema.ConfigError, match=message) as error:
    population.check_lrs(lrs)
  assert "\n" not in str(error.value)


def test_an_unknown_member_loop_is_refused():
  with pytest.raises(ValueError, match="member_loop='pmap': choose one of vmap, unroll"):
    population.build_population(tiny(), LRS, device.data_mesh(), 10, (40,), steps_per_epoch=3,
                                 member_loop="pmap")


# ------------------------------------------------------------------ a population on disk


def test_each_member_of_a_population_workdir_is_a_finished_single_run(tmp_path):
  config = tiny()
  members = population.train_population(config, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  for member in members:
    directory = tmp_path / population_disk.member_name(member.lr)
    assert records.read(directory) == member.records  # every key, as returned
    assert records.read_config(directory)["lr"] == member.lr and records.finished(directory)
    assert workdir_lib.verified_config(directory)["lr"] == member.lr  # its checkpoint carries its config's digest
    tpt = directory / "tpt.json"
    assert (json.loads(tpt.read_text())["tpt_start_epoch"] if tpt.exists() else None) == member.tpt_start_epoch
    # the single-run trainer takes the member as its own finished run: nothing to do, its last record back
    last = train_and_evaluate(population.member_config(config, member.lr), str(directory), **QUIET)
    assert last == member.records[-1]
    # and collect measures its checkpoint as the run's own last measurement (its accumulators sum in another
    # order than the vmapped evaluation: ~1e-6 relative measured; 1e-4 leaves margin)
    measured = collect_lib.collect_workdir(directory, tmp_path / f"nc_{member.lr}", quiet=True, warn=QUIET["log"])
    assert measured["epoch"] == last["epoch"]
    for key in ("nc1", "self_duality", "equinorm_means", "ncc_mismatch", "test_acc", "train_loss"):
      np.testing.assert_allclose(measured[key], last[key], rtol=1e-4, atol=1e-7, err_msg=key)
  own = tmp_path / population_disk.population_name(LRS[:2])
  assert json.loads((own / population_disk.STATE_FILE).read_text())["lrs"] == list(LRS[:2])
  assert {m.tpt_start_epoch for m in members} == {None, 3}  # lr 0.01 never reaches TPT here, lr 0.03 at epoch 3


def test_a_populations_wall_time_counts_from_its_epoch_loop_as_a_single_runs(tmp_path, monkeypatch):
  pause = 5.0  # before the epoch loop (the restore, placing the data): not training time
  place = device.put_replicated
  paused = []
  def slow_place(*arguments):
    if not paused:
      time.sleep(pause)
      paused.append(pause)
    return place(*arguments)
  monkeypatch.setattr(device, "put_replicated", slow_place)
  began = time.perf_counter()
  members = population.train_population(tiny(), LRS[:1], workdir=tmp_path, log=QUIET["log"])
  total = time.perf_counter() - began
  assert paused and members[0].records[-1]["wall_time"] <= total - pause


def test_a_killed_population_resumes_to_the_records_of_an_unbroken_one(tmp_path, monkeypatch):
  config = tiny()
  unbroken = population.train_population(config, LRS[:2], log=QUIET["log"])
  save = population_disk.PopulationDisk.save

  class Killed(Exception):
    pass

  def save_then_die(self, epoch, state, members):
    save(self, epoch, state, members)
    raise Killed  # the process dies right after the first population checkpoint

  monkeypatch.setattr(population_disk.PopulationDisk, "save", save_then_die)
  with pytest.raises(Killed):
    population.train_population(config, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  first = [len(records.read(tmp_path / population_disk.member_name(lr))) for lr in LRS[:2]]
  assert first == [1, 1]  # epoch 1 measured and checkpointed, nothing after it
  monkeypatch.setattr(population_disk.PopulationDisk, "save", save)
  lines = []
  resumed = population.train_population(config, LRS[:2], workdir=tmp_path, log=lines.append)
  assert any("resumed the population of 2 members from its checkpoint of epoch 1" in line for line in lines)
  for again, whole in zip(resumed, unbroken):
    assert without_noise(again) == without_noise(whole)  # bit for bit: the same program from the same state
    assert without_noise(again) == [{k: v for k, v in r.items() if k not in NOISE}
                                    for r in records.read(tmp_path / population_disk.member_name(again.lr))]


def test_a_population_workdir_refuses_another_config_unless_overwritten_and_shares_the_folder(tmp_path):
  config = tiny()
  config.update(num_epochs=1, measure_epochs=(1,), lr_decay_epochs=())
  population.train_population(config, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  other = tiny()
  other.update(num_epochs=1, measure_epochs=(1,), lr_decay_epochs=(), weight_decay=1e-3)
  with pytest.raises(workdir_lib.WorkdirError, match="another config.*--overwrite") as error:
    population.train_population(other, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  assert "\n" not in str(error.value)
  assert records.read_config(tmp_path / population_disk.member_name(LRS[0]))["weight_decay"] == config.weight_decay
  own = tmp_path / population_disk.population_name(LRS[:2])
  (own / population_disk.STATE_FILE).write_text("{damaged")  # and the members' configs gone: the checkpoint says
  for lr in LRS[:2]:
    (tmp_path / population_disk.member_name(lr) / "config.json").unlink()
  with pytest.raises(workdir_lib.WorkdirError, match="checkpoint of epoch 1 was trained with another config"):
    population.train_population(other, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  members = population.train_population(other, LRS[:2], workdir=tmp_path, overwrite=True, log=QUIET["log"])
  assert [len(records.read(tmp_path / population_disk.member_name(m.lr))) for m in members] == [1, 1]
  assert records.read_config(tmp_path / population_disk.member_name(LRS[0]))["weight_decay"] == 1e-3
  # a population of the cell's other lrs goes into the same folder, beside it (as grid.py's single runs do)
  population.train_population(other, LRS[2:], workdir=tmp_path, log=QUIET["log"])
  assert sorted(p.name for p in tmp_path.glob("lr_*")) == sorted(population_disk.member_name(lr) for lr in LRS)


def test_a_damaged_population_checkpoint_is_moved_aside_and_the_population_goes_on(tmp_path, capsys):
  config = tiny()
  unbroken = population.train_population(config, LRS[:2], log=QUIET["log"])
  population.train_population(config, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  checkpoints = tmp_path / population_disk.population_name(LRS[:2]) / "checkpoints"
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved[-1] == 3 and len(saved) >= 2
  shutil.rmtree(checkpoints / "3" / "state")  # the newest checkpoint loses its arrays
  for lr in LRS[:2]:  # and the members' own end-of-run checkpoints go, so their runs are unfinished again
    shutil.rmtree(tmp_path / population_disk.member_name(lr) / "checkpoints")
  lines = []
  again = population.train_population(config, LRS[:2], workdir=tmp_path, log=lines.append)
  warning = capsys.readouterr().err
  assert f"{checkpoints / '3'} is damaged" in warning and "moved to" in warning
  assert any(f"from its checkpoint of epoch {saved[-2]}" in line for line in lines), lines
  for member, whole in zip(again, unbroken):
    assert without_noise(member) == without_noise(whole)
    directory = tmp_path / population_disk.member_name(member.lr)
    assert without_noise(member) == [{k: v for k, v in r.items() if k not in NOISE} for r in records.read(directory)]
    assert records.finished(directory) and (directory / "checkpoints" / "3").is_dir()


def test_sigterm_checkpoints_the_population_at_the_epochs_end_and_a_rerun_resumes_it(tmp_path):
  config = tiny()
  unbroken = population.train_population(config, LRS[:2], log=QUIET["log"])

  def log(line):  # SIGTERM arrives while epoch 2 is still ahead (after epoch 1's line)
    if line.startswith("epoch    1"):
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(Preempted, match="stopped by SIGTERM after epoch 2; checkpoint saved"):
    population.train_population(config, LRS[:2], workdir=tmp_path, log=log)
  checkpoints = tmp_path / population_disk.population_name(LRS[:2]) / "checkpoints"
  assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == 2  # epoch 2 is not measured
  lines = []
  again = population.train_population(config, LRS[:2], workdir=tmp_path, log=lines.append)
  assert any("from its checkpoint of epoch 2" in line for line in lines), lines
  for member, whole in zip(again, unbroken):
    assert without_noise(member) == without_noise(whole)


TINY_FLAGS = ["--config.num_epochs=3", "--config.per_class=40", "--config.measure_epochs=(1,3)",
              "--config.lr_decay_epochs=(3,)", "--config.tpt_threshold=0.25"]  # tiny() as flags


@pytest.mark.slow
def test_two_processes_of_four_devices_train_the_population_of_one_process_of_eight(tmp_path):
  # K = 2 on 2 x 4 devices: a (2 member, 4 data) mesh, so each process holds one member and both write nothing
  # but process 0's files; the records equal one process of 8 fake devices' (the same mesh) within rounding.
  lrs = LRS[:2]
  one = population.train_population(tiny(), lrs, workdir=tmp_path / "one", log=QUIET["log"])
  address = f"127.0.0.1:{run_helpers.free_port()}"
  processes = [subprocess.Popen(
      run_helpers.train_command(tmp_path / "two", f"--lrs={lrs[0]},{lrs[1]}", *TINY_FLAGS,
                                "--coordinator_address", address, "--num_processes", "2", "--process_id", str(rank)),
      cwd=run_helpers.REPO, env=run_helpers.cpu_env({"JAX_NUM_CPU_DEVICES": "4"}), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert "epoch    3" in outputs[0] and "epoch    3" not in outputs[1]  # only process 0 logs
  for member in one:
    directory = tmp_path / "two" / population_disk.member_name(member.lr)
    theirs = [{k: v for k, v in r.items() if k not in NOISE} for r in records.read(directory)]
    assert_within_rounding([theirs], [without_noise(member)], rtol=2e-4)
    assert records.finished(directory) and workdir_lib.verified_config(directory)["lr"] == member.lr


@pytest.mark.slow
def test_a_population_killed_with_sigkill_resumes_to_the_records_and_state_of_an_unbroken_one(tmp_path):
  flags = [f"--lrs={LRS[0]},{LRS[1]}", "--config.num_epochs=16", "--config.per_class=40",
           "--config.measure_epochs=(1,4,8,12,16)", "--config.checkpoint_every_epochs=1"]
  straight = subprocess.run(run_helpers.train_command(tmp_path / "straight", *flags), cwd=run_helpers.REPO,
                            env=run_helpers.cpu_env(), capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  interrupted = tmp_path / "interrupted"
  own = interrupted / population_disk.population_name(LRS[:2]) / "checkpoints"
  process = subprocess.Popen(run_helpers.train_command(interrupted, *flags), cwd=run_helpers.REPO,
                             env=run_helpers.cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (own / "6").exists() and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_after = max(int(p.name) for p in own.iterdir() if p.name.isdigit())
  assert killed_after < 16, "the population finished before it could be killed; make it longer"
  again = subprocess.run(run_helpers.train_command(interrupted, *flags), cwd=run_helpers.REPO,
                         env=run_helpers.cpu_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "resumed the population of 2 members" in again.stdout, again.stdout
  for lr in LRS[:2]:
    name = population_disk.member_name(lr)
    run_helpers.assert_same_run(interrupted / name, tmp_path / "straight" / name, last_epoch=16)


def test_a_member_folder_in_use_by_a_single_run_is_refused_before_anything_is_written(tmp_path):
  busy = tmp_path / population_disk.member_name(LRS[1])
  busy.mkdir()
  with workdir_lib.Lock(busy):  # a single run of that lr is training there
    with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {busy} is in use by another run") as error:
      population.train_population(tiny(), LRS[:2], workdir=tmp_path, log=QUIET["log"])
  assert "\n" not in str(error.value)
  assert not (tmp_path / population_disk.member_name(LRS[0]) / "config.json").exists()
  # and the locks taken before the refusal were let go: the population trains once the run is gone
  config = tiny()
  config.update(num_epochs=1, measure_epochs=(1,), lr_decay_epochs=())
  members = population.train_population(config, LRS[:2], workdir=tmp_path, log=QUIET["log"])
  assert [len(m.records) for m in members] == [1, 1]
