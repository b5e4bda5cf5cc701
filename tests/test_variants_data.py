"""Data variants of the protocol: class imbalance (minority collapse) and random labels, end to end."""

import json

import numpy as np
import pytest

from nc_jax import data, report, schema
from nc_jax.data import preprocess
from nc_jax.metrics import imbalance
from nc_jax.training import train_and_evaluate
from configs import default as default_config


class TestCounts:

  def test_step_and_exponential_counts_by_hand(self):
    # step: the last C // 2 classes keep 100 / 10; exponential: 100 * 10^(-c/3) = 100, 46.4, 21.5, 10
    assert preprocess.imbalanced_counts(100, 4, "step", 10.0).tolist() == [100, 100, 10, 10]
    assert preprocess.imbalanced_counts(100, 4, "step", 10.0, minority_classes=1).tolist() == [100, 100, 100, 10]
    assert preprocess.imbalanced_counts(100, 4, "exponential", 10.0).tolist() == [100, 46, 22, 10]
    assert preprocess.imbalanced_counts(100, 4, "none", 10.0).tolist() == [100] * 4
    assert preprocess.imbalanced_counts(5, 3, "step", 1000.0).tolist() == [5, 5, 1]  # never an empty class

  def test_bad_minority_count_is_refused(self):
    with pytest.raises(ValueError, match="fewer than the 4 classes"):
      preprocess.imbalanced_counts(100, 4, "step", 10.0, minority_classes=4)

  def test_load_keeps_the_counts_and_nests_the_subsets(self):
    strong = data.load("mnist1d", per_class=200, imbalance="step", imbalance_ratio=20.0)
    mild = data.load("mnist1d", per_class=200, imbalance="step", imbalance_ratio=2.0)
    assert np.bincount(strong.train_labels).tolist() == [200] * 5 + [10] * 5
    assert np.bincount(mild.train_labels).tolist() == [200] * 5 + [100] * 5
    assert set(strong.train_indices) <= set(mild.train_indices)  # runs at two ratios share their examples
    assert len(strong.test_labels) == len(mild.test_labels)  # the test set is never thinned


class TestRandomLabels:

  def test_fraction_is_shuffled_counts_kept_test_untouched(self):
    clean = data.load("mnist1d")
    noisy = data.load("mnist1d", random_label_fraction=0.5)
    np.testing.assert_array_equal(noisy.train_true_labels, clean.train_labels)
    np.testing.assert_array_equal(noisy.test_labels, clean.test_labels)
    assert np.bincount(noisy.train_labels).tolist() == np.bincount(clean.train_labels).tolist()
    changed = np.mean(noisy.train_labels != clean.train_labels)
    # half the labels permuted among 10 balanced classes: about 0.5 * 0.9 of them change
    assert 0.40 < changed < 0.50
    again = data.load("mnist1d", random_label_fraction=0.5)
    np.testing.assert_array_equal(again.train_labels, noisy.train_labels)  # fixed by the seed
    other = data.load("mnist1d", random_label_fraction=0.5, seed=1)
    assert np.any(other.train_labels != noisy.train_labels)

  def test_zero_and_one(self):
    labels = np.arange(100) % 10
    np.testing.assert_array_equal(preprocess.shuffle_labels(labels, 0.0, 0), labels)
    assert sorted(preprocess.shuffle_labels(labels, 1.0, 0)) == sorted(labels)
    with pytest.raises(ValueError, match="random_label_fraction"):
      preprocess.shuffle_labels(labels, 1.5, 0)


class TestMinorityCollapse:

  def test_against_numpy(self):
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(300, 6)).astype(np.float32), np.arange(300) % 5
    weights = rng.normal(size=(5, 6)).astype(np.float32)
    result = imbalance.minority_collapse(features, labels, 5, weights, minority=(3, 4))
    means = np.stack([features[labels == c].astype(np.float64).mean(0) for c in range(5)])
    centred = means - means.mean(0)

    def cosine(a, b):
      return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    assert float(result["minority_w_cosine"]) == pytest.approx(cosine(weights[3], weights[4]), rel=1e-5)
    majority = np.mean([cosine(weights[i], weights[j]) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert float(result["majority_w_cosine"]) == pytest.approx(majority, rel=1e-5)
    assert float(result["minority_mean_cosine"]) == pytest.approx(cosine(centred[3], centred[4]), rel=1e-4)
    assert float(result["class/2/mean_norm"]) == pytest.approx(np.linalg.norm(centred[2]), rel=1e-5)
    assert float(result["minority_w_norm"]) == pytest.approx(np.linalg.norm(weights[3:], axis=1).mean(), rel=1e-5)

  def test_exact_simplex_gives_its_cosine_in_both_groups(self):
    num_classes = 6
    etf = np.eye(num_classes) - 1.0 / num_classes  # rows: a simplex ETF (cosines -1/(C-1))
    labels = np.repeat(np.arange(num_classes), 4)
    result = imbalance.minority_collapse(etf[labels], labels, num_classes, etf, minority=(3, 4, 5))
    for key in ("minority_w_cosine", "majority_w_cosine", "minority_mean_cosine", "majority_mean_cosine"):
      assert float(result[key]) == pytest.approx(-1 / (num_classes - 1), abs=1e-6)


class TestConfig:

  @pytest.mark.parametrize("overrides, key", [
      ({"imbalance": "steep"}, "imbalance"),
      ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
      ({"random_label_fraction": 1.5}, "random_label_fraction"),
      ({"minority_classes": -1}, "minority_classes"),
      ({"imbalance": "step", "per_class": None}, "per_class"),
  ])
  def test_bad_values_are_refused_naming_the_key(self, overrides, key):
    config = default_config.get_config()
    config.update(overrides)
    with pytest.raises(schema.ConfigError, match=f"config.{key} "):
      schema.validate(config)


def test_imbalanced_run_logs_minority_collapse_and_report_draws_it(tmp_path):
  config = default_config.get_config()
  config.update(num_epochs=3, measure_epochs=(1, 3), imbalance="step", imbalance_ratio=10.0, per_class="200",
                deepfool_samples=0)
  train_and_evaluate(config, str(tmp_path / "run"), log=lambda *a, **k: None)
  last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
  for key in ("minority_w_cosine", "majority_w_cosine", "minority_mean_cosine", "class/0/w_norm", "class/9/mean_norm"):
    assert np.isfinite(last[key]), key
  assert -1 <= last["minority_w_cosine"] <= 1
  assert "imbalance step, imbalance_ratio 10.0" in report.load_run(str(tmp_path / "run")).name  # titled
  report.write_report([str(tmp_path / "run")], str(tmp_path / "report"))
  assert (tmp_path / "report" / "fig_class_norms.png").exists()
  assert (tmp_path / "report" / "fig_minority_cosines.png").exists()


def test_random_label_run_trains_end_to_end(tmp_path):
  config = default_config.get_config()
  config.update(num_epochs=2, measure_epochs=(2,), random_label_fraction=0.3, deepfool_samples=0)
  last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  assert np.isfinite(last["nc1"])
  assert "minority_w_cosine" not in last  # balanced: no imbalance statistics
