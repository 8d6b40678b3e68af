import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax import batchnorm, data, datasets, evaluation, masking, results
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import connectivity

from . import equivalence
from .saved_runs_for_analyses import LENET300_EVAL_RTOL, compute_test_logits, get_saved_run


class TinyBNNet(nn.Module):
  """Dense + BatchNorm + Dense: BN statistics must be recomputed along the line."""

  num_classes: int = 10
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    return nn.Dense(self.num_classes)(nn.relu(x))


@pytest.fixture(scope="module")
def setting():
  dataset = datasets.Dataset.from_digits().hold_out(validation_size=100)
  model = TinyBNNet()
  x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  a, b = (model.init(jax.random.key(s), x, train=False) for s in (0, 1))
  prunable = masking.compute_prunable(a["params"])
  mask = masking.compute_mask(b["params"], masking.create_dense_mask(a["params"]), prunable, 0.5)
  params_a = masking.apply_mask(a["params"], mask)
  params_b = masking.apply_mask(b["params"], mask)
  return dataset, model, params_a, params_b, a["batch_stats"], mask


def _metrics_with_recomputed_bn(model, params, batch_stats, dataset):
  train, mean, std = (jnp.asarray(a) for a in (dataset.train_images, dataset.mean, dataset.std))
  stats = batchnorm.recompute_batch_stats(model, params, batch_stats, train, mean, std, 64, 0)
  test_images, test_labels = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)
  variables = {"params": params, "batch_stats": stats}
  metrics = evaluation.compute_metrics(model, variables, test_images, test_labels, mean, std, 100)
  logits = model.apply(variables, data.preprocess(test_images, mean, std), train=False)
  return metrics, np.asarray(logits)


# The path's program vs eager calls (tests/equivalence.py): dense, BN statistics, their mean
# over the recompute's batches, dense and the test-set mean in sequence; sums of <= 360 terms.
TINY_BN_EVAL_RTOL = equivalence.training_rtol(1, 360, depth=5)


def _path(setting, params_a, params_b, mask, split="test"):
  dataset, model, _, _, batch_stats, _ = setting
  return connectivity.compute_linear_connectivity(
    model, params_a, params_b, batch_stats, mask, dataset, split, 5, 100, 64, 0
  )


def test_interpolation_endpoints_reproduce_the_endpoint_metrics(setting):
  dataset, model, params_a, params_b, batch_stats, mask = setting
  path = _path(setting, params_a, params_b, mask)
  np.testing.assert_array_equal(path["alphas"], [0, 0.25, 0.5, 0.75, 1])
  for i, params in ((0, params_a), (-1, params_b)):
    expected, logits = _metrics_with_recomputed_bn(model, params, batch_stats, dataset)
    acc = float(expected["accuracy"])
    equivalence.assert_accuracies_agree(path["accuracy"][i], acc, logits, TINY_BN_EVAL_RTOL)
    equivalence.assert_close_normwise(path["loss"][i], expected["loss"], TINY_BN_EVAL_RTOL)
  assert path["loss_barrier"] >= 0 and path["accuracy_barrier"] >= 0


def test_barrier_of_a_model_with_itself_is_zero(setting):
  _, _, params_a, _, _, mask = setting
  path = _path(setting, params_a, params_a, mask)
  np.testing.assert_allclose(path["loss"], path["loss"][0], rtol=1e-5)
  assert path["loss_barrier"] == pytest.approx(0.0, abs=1e-5)
  assert path["accuracy_barrier"] == pytest.approx(0.0, abs=1e-6)


def test_points_are_projected_onto_the_mask(setting):
  dataset, model, params_a, params_b, batch_stats, mask = setting
  dense_b = jax.tree_util.tree_map(lambda p: p + 0.3, params_b)  # nonzero where pruned
  projected = _path(setting, params_a, dense_b, mask)
  expected = _path(setting, params_a, masking.apply_mask(dense_b, mask), None)
  np.testing.assert_array_equal(projected["accuracy"], expected["accuracy"])
  np.testing.assert_allclose(projected["loss"], expected["loss"], rtol=1e-6)
  unprojected = _path(setting, params_a, dense_b, None)
  assert not np.allclose(unprojected["loss"][1:], expected["loss"][1:])


def test_compute_barrier_of_known_curves():
  alphas = [0.0, 0.5, 1.0]
  assert connectivity.compute_barrier(alphas, [1.0, 3.0, 2.0]) == pytest.approx(1.5)
  assert connectivity.compute_barrier(alphas, [1.0, 1.5, 2.0]) == pytest.approx(0.0)
  assert connectivity.compute_barrier(alphas, [2.0, 0.0, 2.0]) == 0.0  # a valley: no barrier
  drop = connectivity.compute_barrier(alphas, [0.9, 0.5, 0.7], higher_is_better=True)
  assert drop == pytest.approx(0.3)
  with pytest.raises(ValueError, match="from 0 to 1"):
    connectivity.compute_barrier([0.1, 1.0], [1.0, 1.0])


def test_saved_run_paths_end_at_the_saved_solutions(tmp_path_factory):
  workdir = get_saved_run("swamp", tmp_path_factory)
  rounds = results.read_results(workdir)
  path = connectivity.compute_particle_connectivity(workdir, 1, (0, 1), num_alphas=3)
  # The path's program and the run's evaluate the same models: equal up to near-ties.
  saved = {r: workdir_lib.load_round_model(workdir, r) for r in (1, 2)}

  def assert_same_accuracy(accuracy, expected, params):
    logits = compute_test_logits(workdir, params)
    equivalence.assert_accuracies_agree(accuracy, expected, logits, LENET300_EVAL_RTOL)

  for end, i in ((0, 0), (-1, 1)):
    particle = jax.tree_util.tree_map(lambda x, i=i: x[i], saved[1]["particle_params"])
    assert_same_accuracy(path["accuracy"][end], rounds[1].particle_test_accuracy[i], particle)
  for mask_from in ("earlier", "later"):
    path = connectivity.compute_round_connectivity(workdir, 1, mask_from, num_alphas=3)
    # w_2 lies in round 2's mask, so alpha=1 is round 2's model under either choice.
    assert_same_accuracy(path["accuracy"][-1], rounds[2].test_accuracy, saved[2]["params"])
    if mask_from == "earlier":
      assert_same_accuracy(path["accuracy"][0], rounds[1].test_accuracy, saved[1]["params"])
  with pytest.raises(ValueError, match="mask_from"):
    connectivity.compute_round_connectivity(workdir, 1, "both")
