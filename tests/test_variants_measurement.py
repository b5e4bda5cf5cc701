"""Protocol variants, measured: the MSE decomposition during training, the NC suite per layer, the end-of-run summary.

One short MSE run (configs/default_mse.py:smoke with per_layer_nc, TPT threshold lowered so the smoke run
reaches it) is shared by the run-level tests; the evaluation is also checked on its own against the float64
reference on stage features computed directly.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config, default_mse
from nc_jax import models, records, report
from nc_jax.data import device
from nc_jax.training import evaluate as evaluate_lib, schedule, step as step_lib, train_and_evaluate
from tests import reference

MSE_TERMS = ("mse_lnc1", "mse_lnc23", "mse_lperp")
STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")  # the smoke MLP's hidden layers; layer4: the penultimate


@pytest.fixture(scope="module")
def mse_run(tmp_path_factory):
  """(workdir, printed lines, returned metrics) of a 6-epoch MSE run with per-layer NC."""
  workdir = tmp_path_factory.mktemp("mse_run")
  config = default_mse.get_config("smoke")
  config.per_layer_nc, config.tpt_threshold, config.deepfool_samples = True, 0.2, 0
  lines = []
  last = train_and_evaluate(config, str(workdir), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  return workdir, "\n".join(lines).splitlines(), last, config


def test_default_mse_is_the_default_job_with_the_notebooks_mse_lr():
  for variant in ("", "smoke"):
    default, mse = default_config.get_config(variant).to_dict(), default_mse.get_config(variant).to_dict()
    assert (mse["loss"], mse["lr"]) == ("mse", 0.0184)
    assert {**mse, "loss": default["loss"], "lr": default["lr"]} == default


def test_mse_run_logs_a_decomposition_that_adds_up(mse_run):
  workdir, _, _, _ = mse_run
  logged = records.read(workdir)
  start = records.tpt_start(logged)
  assert start is not None and [r["epoch"] for r in logged] == sorted({1, 3, 6, start})  # schedule + TPT start
  for record in logged:
    terms = [records.number(record[key]) for key in (*MSE_TERMS, "mse_total")]
    assert None not in terms and min(terms) > 0, record
    assert sum(terms[:3]) == pytest.approx(terms[3], rel=1e-5), record  # mse_total is computed from the samples
  assert logged[-1]["mse_lperp"] < logged[0]["mse_lperp"]  # training moves W towards the ridge classifier


def test_per_layer_suite_for_every_stage_and_the_last_stage_is_the_main_measurement(mse_run):
  workdir, _, _, _ = mse_run
  for record in records.read(workdir):
    for stage in STAGES:
      for key in evaluate_lib.PER_LAYER_KEYS:
        assert records.number(record[f"layer/{stage}/{key}"]) is not None, (record["epoch"], stage, key)
    for key in ("nc1", "equinorm_means", "equiangular_means", "max_angle_means", "ncc_accuracy"):
      assert record[f"layer/layer4/{key}"] == pytest.approx(record[key], rel=1e-5), key  # float32 sums, 8 devices


def test_summary_at_the_end_and_when_a_finished_run_is_rerun(mse_run):
  workdir, lines, last, config = mse_run
  logged = records.read(workdir)
  start = records.first_in_tpt(logged)
  summary = lines[lines.index(next(l for l in lines if l.startswith("summary of "))):]
  assert summary[0] == f"summary of {workdir}: {len(logged)} measurements, epochs 1..6"
  assert summary[1] == f"  TPT: from epoch {start['epoch']}"
  ratio = logged[0]["nc1"] / logged[-1]["nc1"]
  direction = f"{ratio:.3g}x lower" if ratio >= 1 else f"{1 / ratio:.3g}x higher"
  assert summary[2] == (f"  NC1: {logged[0]['nc1']:.3g} at epoch 1 -> {logged[-1]['nc1']:.3g} at epoch 6 "
                        f"({direction})")
  assert summary[3] == (f"  test accuracy: {start['test_acc']:.4f} at the TPT start (epoch {start['epoch']}) -> "
                        f"{last['test_acc']:.4f} at the end (epoch 6), "
                        f"{100 * (last['test_acc'] - start['test_acc']):+.2f} points")
  assert summary[4] == f"  figures: python -m nc_jax.report {workdir} --out {workdir}/report"
  again = []
  train_and_evaluate(config, str(workdir), log=lambda *a, **k: again.append(" ".join(map(str, a))))
  assert again[-2].startswith("already trained for 6 epochs") and again[-1].splitlines() == summary


def test_summary_of_a_run_that_never_reached_tpt():
  logged = [{"epoch": 1, "nc1": 8.0, "test_acc": 0.5, "epoch_acc": 0.6, "tpt_start_epoch": -1},
            {"epoch": 9, "nc1": "nan", "test_acc": 0.7, "epoch_acc": 0.9, "tpt_start_epoch": -1}]
  assert records.summary(logged, "runs/a b", 0.999) == [
      "summary of runs/a b: 2 measurements, epochs 1..9",
      "  TPT: not reached (train accuracy >= 0.999 at no epoch; 0.9000 at epoch 9)",
      "  NC1: 8 at epoch 1 -> n/a at epoch 9",
      "  test accuracy: 0.7000 at the end (epoch 9)",
      "  figures: python -m nc_jax.report 'runs/a b' --out 'runs/a b/report'"]


def test_report_draws_the_mse_decomposition_and_collapse_against_depth(mse_run, tmp_path):
  workdir, _, _, _ = mse_run
  text = report.write_report([workdir], tmp_path).read_text()
  for name in ("fig9_mse_decomposition.png", "fig_depth.png"):
    assert (tmp_path / name).stat().st_size > 10_000 and f"({name})" in text
  assert report._stages({"layer/layer10/nc1": 1, "layer/layer2/nc1": 1, "nc1": 1}) == ["layer2", "layer10"]


# ----------------------------------------------------------------------------- the evaluation on its own


def _evaluate_small_cnn():
  """evaluate() of a fresh SimpleCNN on 64 random 8x8 images of 3 classes, with the inputs it saw."""
  num_classes, rng = 3, np.random.default_rng(0)
  labels = np.arange(64, dtype=np.int32) % num_classes
  inputs = (rng.normal(size=(64, 8, 8, 1)) + labels[:, None, None, None] * 0.5).astype(np.float32)
  model = models.create("cnn", num_classes, channels=(4, 6), width=8)
  tx = schedule.sgd(schedule.learning_rate(0.1, 1, (), 0.1), 0.9, 5e-4)
  state = step_lib.create_state(model, tx, inputs.shape[1:], 0)
  mesh = device.data_mesh()
  put = functools.partial(device.put_replicated, mesh=mesh)
  evaluate = jax.jit(functools.partial(evaluate_lib.evaluate, measurement=evaluate_lib.Measurement(
      model=model, loss_fn=step_lib.loss_function("mse"), num_classes=num_classes, batch_size=16, mesh=mesh,
      per_layer=True, mse_weight_decay=5e-4)))
  result = jax.device_get(evaluate(state, put(inputs), put(labels), put(inputs[:16]), put(labels[:16])))
  return result, model, state, inputs, labels


def test_evaluation_matches_the_float64_reference_on_stage_features():
  result, model, state, inputs, labels = _evaluate_small_cnn()
  _, features, stages = models.apply_with_intermediates(model, state.variables, jnp.asarray(inputs))
  assert sorted(stages) == ["stage0", "stage1"]
  for name, maps in stages.items():
    pooled = np.asarray(maps, np.float64).mean(axis=(1, 2))  # (N, H, W, c) -> (N, c)
    want = reference.reference_metrics(pooled, labels, 3)
    for key in evaluate_lib.PER_LAYER_KEYS:
      assert float(result[f"layer/{name}/{key}"]) == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)
  weights, bias = models.classifier_weights(state.params)
  want_total = reference.reference_mse_terms(features, labels, 3, weights, bias, 5e-4)
  assert float(result["mse_total"]) == pytest.approx(want_total, rel=1e-5)
  total = sum(float(result[key]) for key in MSE_TERMS)
  assert math.isfinite(total) and total == pytest.approx(want_total, rel=1e-4)
