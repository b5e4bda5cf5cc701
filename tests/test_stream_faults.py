"""Streamed runs survive faults mid-epoch, run on several processes each reading its shard, in bounded memory.

Runs are the default config's smoke variant (a width-32 MLP on MNIST-1D) with input_pipeline='stream', or
Fashion-MNIST (the Debian package's IDX files, uint8, as the multi-process statistics pass needs).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default as default_config
from nc_jax import records
from nc_jax.data import idx, stream
from nc_jax.training import Preempted, checkpoints, preemption, train_and_evaluate
from tests.run_helpers import QUIET, REPO, assert_same_run, cli, comparable, cpu_env, free_port, train_command

STREAMED = ["--config.input_pipeline=stream", "--config.epoch_loop=steps"]


def smoke(**overrides):
  config = default_config.get_config("smoke")
  config.update({**dict(num_epochs=4, measure_epochs=(1, 2, 3, 4), deepfool_samples=0, input_pipeline="stream",
                        epoch_loop="steps", batch_size=504), **overrides})  # 7 steps per epoch
  return config


def mid_epoch_metas(run):
  directory = run / "checkpoints" / preemption.MID_EPOCH_DIR
  manager = checkpoints.Checkpoints(directory, read_only=True)
  try:
    return {step: manager.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            for step in manager.epochs()}
  finally:
    manager.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(smoke(), str(workdir), **QUIET)
  return workdir


# ------------------------------------------------------------------ (1) exact resume mid-epoch
def test_sigterm_mid_epoch_checkpoints_that_step_and_the_rerun_is_exact(straight, tmp_path, monkeypatch):
  original = stream.TrainStream.__next__

  def next_then_signal(self):
    batch = original(self)
    if self.get_state() == {"epoch": 3, "step": 5}:  # the signal arrives while step 5 of epoch 3 is read
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with monkeypatch.context() as patch:
    patch.setattr(stream.TrainStream, "__next__", next_then_signal)
    with pytest.raises(Preempted, match="SIGTERM in epoch 3 after step 5"):
      train_and_evaluate(smoke(), str(tmp_path), **QUIET)
  metas = mid_epoch_metas(tmp_path)
  assert [m["input_state"] for m in metas.values()] == [{"epoch": 3, "step": 5}]
  assert set(metas[max(metas)]["epoch_totals"]) == {"loss", "correct"}  # the epoch's sums so far
  assert [r["epoch"] for r in records.read(tmp_path)] == [1, 2]
  lines = []
  train_and_evaluate(smoke(), str(tmp_path), log=lines.append)
  assert any(line.startswith("resumed from the mid-epoch checkpoint of epoch 3 step 5") for line in lines), lines
  assert_same_run(tmp_path, straight)


def test_a_mid_epoch_checkpoint_of_another_config_is_not_resumed(tmp_path, monkeypatch):
  original = stream.TrainStream.__next__

  def next_then_signal(self):
    batch = original(self)
    if self.get_state() == {"epoch": 1, "step": 3}:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with monkeypatch.context() as patch:
    patch.setattr(stream.TrainStream, "__next__", next_then_signal)
    with pytest.raises(Preempted, match="in epoch 1 after step 3"):
      train_and_evaluate(smoke(num_epochs=2, measure_epochs=(2,)), str(tmp_path), **QUIET)
  # a mid-epoch checkpoint is a result: another lr is refused (it would orphan it), as after an epoch checkpoint
  with pytest.raises(ValueError, match=r"different config \(lr: 0.0255 -> 0.01\)"):
    train_and_evaluate(smoke(num_epochs=2, measure_epochs=(2,), lr=0.01), str(tmp_path), **QUIET)
  lines = []  # with --overwrite it starts afresh, never from the other config's mid-epoch state
  train_and_evaluate(smoke(num_epochs=2, measure_epochs=(2,), lr=0.01), str(tmp_path), overwrite=True,
                     log=lines.append)
  assert not any(line.startswith("resumed") for line in lines) and any("epochs 1..2" in line for line in lines)


def test_seconds_cadence_checkpoints_mid_epoch_without_changing_the_run(straight, tmp_path):
  train_and_evaluate(smoke(checkpoint_every_seconds=1e-9), str(tmp_path), **QUIET)
  metas = mid_epoch_metas(tmp_path)
  assert len(metas) == preemption.MID_EPOCH_KEEP and all(m["input_state"]["step"] > 0 for m in metas.values())
  assert_same_run(tmp_path, straight)


@pytest.mark.slow
def test_kill_9_after_a_mid_epoch_checkpoint_then_rerun_is_exact(tmp_path):
  arguments = [*STREAMED, "--config.num_epochs=4", "--config.measure_epochs=1,2,3,4", "--config.deepfool_samples=0",
               "--config.batch_size=504"]
  assert cli(tmp_path / "straight", *arguments).returncode == 0
  run = tmp_path / "killed"
  killed = cli(run, *arguments, env_extra={preemption.MID_EPOCH_TEST_ENV: "3:4:kill"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert [m["input_state"] for m in mid_epoch_metas(run).values()] == [{"epoch": 3, "step": 4}]
  assert [r["epoch"] for r in records.read(run)] == [1, 2]
  result = cli(run, *arguments)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from the mid-epoch checkpoint of epoch 3 step 4" in result.stdout
  assert_same_run(run, tmp_path / "straight")


# ------------------------------------------------------- (2) several processes, each reading its shard
def read_log(path):
  """{(tag, step): records} of one process's read log (``stream.READ_LOG_ENV``)."""
  lines = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  out = {}
  for line in lines:
    out.setdefault((line["tag"], line["step"]), []).append(line["records"])
  return out


@pytest.mark.slow
@pytest.mark.skipif(not idx.DEBIAN_FASHION_MNIST.exists(),
                    reason=f"no Fashion-MNIST in {idx.DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
def test_two_processes_of_four_devices_stream_their_shards_and_match_one_process_of_eight(tmp_path):
  """Fashion-MNIST streamed from its IDX files (uint8: the statistics' exact sums are added over processes)."""
  arguments = [*STREAMED, "--config.dataset=fashion_mnist", "--config.data_source=idx", "--config.per_class=20",
               "--config.batch_size=40", "--config.eval_batch_size=1000", "--config.num_epochs=3",
               "--config.measure_epochs=1,3", "--config.deepfool_samples=0"]
  env = cpu_env({"JAX_NUM_CPU_DEVICES": "8", stream.READ_LOG_ENV: str(tmp_path / "single.reads")})
  single = subprocess.run(train_command(tmp_path / "single", *arguments), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]

  def two_processes(**env_extra):
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen(
        train_command(tmp_path / "multi", *arguments, "--coordinator_address", address, "--num_processes", "2",
                      "--process_id", str(rank)), cwd=REPO, env={**env, **env_extra},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    return [p.communicate(timeout=300)[0] for p in processes], [p.returncode for p in processes]

  # both processes checkpoint in epoch 2 after step 3 (orbax, together), then are killed (kill -9); the rerun
  # resumes both there
  env |= {"JAX_NUM_CPU_DEVICES": "4", stream.READ_LOG_ENV: str(tmp_path / "killed.reads")}
  outputs, codes = two_processes(**{preemption.MID_EPOCH_TEST_ENV: "2:3:kill"})
  assert codes == [-signal.SIGKILL] * 2, [o[-3000:] for o in outputs]
  env[stream.READ_LOG_ENV] = str(tmp_path / "multi.reads")
  outputs, codes = two_processes()
  assert codes == [0, 0], [o[-3000:] for o in outputs]
  assert "resumed from the mid-epoch checkpoint of epoch 2 step 3" in outputs[0]

  one, multi = comparable(tmp_path / "single"), comparable(tmp_path / "multi")
  assert [r["epoch"] for r in multi] == [r["epoch"] for r in one] == [1, 3]
  for a, b in zip(multi, one):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=0, err_msg=key)

  whole = read_log(tmp_path / "single.reads.0")
  killed, resumed = ([read_log(tmp_path / f"{run}.reads.{p}") for p in (0, 1)] for run in ("killed", "multi"))
  tags = {tag for tag, _ in whole}
  assert tags == {"statistics", "train:1", "train:2", "train:3", "eval:train", "eval:test"}
  # the killed run read epoch 1 and epoch 2's first 3 batches (the stream reads none ahead), the rerun the
  # rest: together, every batch once
  assert sorted(step for tag, step in killed[0] if tag == "train:2") == [0, 1, 2]
  assert sorted(step for tag, step in resumed[0] if tag == "train:2") == [3, 4]
  parts = [{key: ([] if key[0] == "statistics" else killed[p].get(key, [])) + resumed[p].get(key, [])
            for key in {**killed[p], **resumed[p]}} for p in (0, 1)]
  assert ("train:1", 0) not in resumed[0]
  for key, reads in whole.items():
    if key[0] == "statistics":
      continue
    # every global batch read once per use (train: once; eval train: twice per measurement, test: once)
    assert len(parts[0][key]) == len(parts[1][key]) == len(reads)
    for full, first, second in zip(reads, parts[0][key], parts[1][key]):
      half = len(full) // 2
      assert first == full[:half] and second == full[half:], key  # process 0: the first half of each batch only
  def statistics(log):
    return sum((reads[0] for (tag, _), reads in sorted(log.items()) if tag == "statistics"), [])

  # the statistics pass: process p reads the p-th half of the subset, the exact sums are added
  assert statistics(parts[0]) + statistics(parts[1]) == statistics(whole)
  assert len(statistics(parts[0])) == len(statistics(whole)) // 2
  rows = {p: sum(len(r) for key, reads in parts[p].items() if key[0] != "statistics" for r in reads) for p in (0, 1)}
  assert rows[0] == rows[1] == sum(len(r) for key, reads in whole.items() if key[0] != "statistics"
                                   for r in reads) // 2


# ------------------------------------------------------------------ (3) bounded host memory
MEASURE_RSS = """
import json, resource, sys
import jax, jax.numpy as jnp
import tensorflow_datasets  # noqa: F401  (its import is part of the baseline)
from nc_jax.data import device, stream

# VmHWM, the peak resident set of this process image; ru_maxrss would not do: Linux carries it over execve
# from the forked parent (here pytest, often larger than what is measured)
peak = lambda: int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
mesh = device.data_mesh()
total = jax.jit(jnp.sum)
float(total(jnp.ones((256, 32, 32, 3))))
baseline = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # resident now
data = stream.open_dataset(sys.argv[1], data_dir=sys.argv[2], per_class=None, standardization="channel")
rows = 0
for inputs, _ in stream.TrainStream(data, batch_size=256, seed=0, mesh=mesh).epoch(1):
  rows += float(total(inputs)) * 0 + inputs.shape[0]
for split in ("train", "test"):
  for inputs, _, _ in stream.eval_batches(data, split, 256, mesh=mesh):
    rows += float(total(inputs)) * 0 + inputs.shape[0]
print(json.dumps({"baseline": baseline, "peak": peak(), "train": len(data.train_labels), "rows": rows}))
"""


def _noise_builder(count):
  """A tfds builder of ``count`` 32x32x3 noise PNGs (10 classes) named nc_stream_noise_<count>."""
  import tensorflow_datasets as tfds

  def info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def generate(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": stream.encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "label": i % 10}

  name = f"NcStreamNoise{count}"
  return type(name, (tfds.core.GeneratorBasedBuilder,), {
      "VERSION": tfds.core.Version("1.0.0"), "__module__": name.lower(), "_info": info,
      "_split_generators": lambda self, dl: {"train": self._generate_examples(count),
                                             "test": self._generate_examples(500)},
      "_generate_examples": generate})


@pytest.mark.slow
def test_streaming_a_set_12x_larger_needs_no_more_host_memory(tmp_path):
  """Peak RSS growth (VmHWM over the resident set before) of the statistics pass, a training epoch and an evaluation pass over every
  example does not grow with the set: 2000 vs 24000 images (23 vs 281 MiB as standardised float32, 6 vs 70 MiB
  as uint8); ~110-120 MiB for both on jax 0.10.2, ~147 MiB on jax 0.12 (Python 3.13), the measurement's noise
  ~15 MiB. The set held whole as float32 would add 281 MiB on top."""
  growth = {}
  for count in (2000, 24000):
    builder = _noise_builder(count)
    builder(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    result = subprocess.run([sys.executable, "-c", MEASURE_RSS, builder.name, str(tmp_path)], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["train"] == count and measured["rows"] >= 2 * count
    growth[count] = measured["peak"] - measured["baseline"]
  float32_bytes = 24000 * 32 * 32 * 3 * 4
  print(f"peak RSS growth: {growth[2000] / 2**20:.0f} MiB for 2000 images, {growth[24000] / 2**20:.0f} MiB for "
        f"24000 ({float32_bytes / 2**20:.0f} MiB as float32)")
  assert growth[24000] - growth[2000] < 40 * 2**20  # what the larger set adds: as float32 258 MiB, as uint8 64 MiB
  assert growth[24000] < 0.75 * float32_bytes  # well under the float32 set itself


# ----------------------------------------------------------------- (4) nc_jax.collect's batches
def test_whole_batches_split_a_set_as_collect_does():
  dataset = stream.open_dataset("mnist1d", per_class=None)
  materialised = stream.materialise(dataset, "test")
  for count in (1, 3):
    parts = [list(stream.whole_batches(dataset, "test", 96, process_index=p, process_count=count))
             for p in range(count)]
    merged = [batch for group in zip(*parts) for batch in group] + [b for part in parts for b in part[len(parts[-1]):]]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in merged]), materialised)
    np.testing.assert_array_equal(np.concatenate([y for _, y in merged]), dataset.test_labels)
  later = list(stream.whole_batches(dataset, "test", 96, process_index=1, process_count=3, start=2))
  np.testing.assert_array_equal(later[0][0], materialised[(1 + 2 * 3) * 96:(2 + 2 * 3) * 96])


# ------------------------------------------------------- (4) children die with their parent
HOLD_A_STREAM = """
import sys
from nc_jax.data import stream
data = stream.open_dataset("synthetic", source="generated", per_class=None, feature_dim=64, train_per_class=400)
batches = stream.TrainStream(data, batch_size=40, seed=0, worker_count=2)
next(batches)  # the workers now fill their buffers and wait to hand them over
print("ready", flush=True)
sys.stdin.readline()
"""


def _children(pid):
  """Pids of the live (not zombie) processes whose parent is ``pid``, from /proc."""
  found = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
      continue
    if int(fields[1]) == pid and fields[0] != "Z":
      found.append(int(stat.parent.name))
  return found


def _alive(pid):
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_grain_workers_and_the_resource_tracker_exit_when_the_trainer_is_killed(tmp_path):
  """kill -9 of a process streaming with 2 grain workers once left both workers (waiting forever to hand over
  their batches) and multiprocessing's resource tracker alive; each worker now exits within a second of its
  parent's death, and the tracker with them."""
  import time
  parent = subprocess.Popen([sys.executable, "-c", HOLD_A_STREAM], cwd=REPO, env=cpu_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  try:
    assert parent.stdout.readline().strip() == "ready"
    children = _children(parent.pid)
    assert len(children) >= 2, children  # two workers (and the resource tracker)
  finally:
    parent.kill()
    parent.wait()
  deadline = time.monotonic() + 15  # 0.6 s when quiet; two suites on 2 cores once took over 5 s
  while time.monotonic() < deadline and any(_alive(pid) for pid in children):
    time.sleep(0.1)
  survivors = [pid for pid in children if _alive(pid)]
  for pid in survivors:  # leave nothing behind, whatever the outcome
    os.kill(pid, signal.SIGKILL)
  assert not survivors, f"still alive 15 s after their parent's kill -9: {survivors}"
