import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swamp_jax import data, datasets, evaluation, imp, models, results, saved_runs
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import ensembles

from . import equivalence
from .saved_runs_for_analyses import LENET300_EVAL_RTOL, compute_test_logits, get_saved_run


@pytest.fixture(scope="module")
def digits():
  return datasets.Dataset.from_digits()


def _init(model, seed, dataset):
  x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  return model.init(jax.random.key(seed), x, train=False)["params"]


def _args(dataset):
  return (
    jnp.asarray(dataset.test_images),
    jnp.asarray(dataset.test_labels),
    jnp.asarray(dataset.mean),
    jnp.asarray(dataset.std),
  )


RTOL = LENET300_EVAL_RTOL


def _logits(model, params, dataset):
  x = data.preprocess(dataset.test_images, dataset.mean, dataset.std)
  return np.asarray(model.apply({"params": params}, x, train=False))


def test_ensemble_of_identical_members_equals_the_member(digits):
  model = models.create_model("lenet300_100", 10)
  params = _init(model, 0, digits)
  images, labels, mean, std = _args(digits)
  stacked = ensembles.stack_members([params, params])
  out = ensembles.evaluate_ensemble(model, stacked, {}, images, labels, mean, std, 128)
  single = evaluation.compute_metrics(model, {"params": params}, images, labels, mean, std, 128)
  # Two programs (softmax then mean, vs logits): equal up to near-ties, and the loss up to
  # the rounding of the logits and of the test-set mean (360 terms).
  logits = _logits(model, params, digits)
  accuracy = float(single["accuracy"])
  equivalence.assert_accuracies_agree(float(out["accuracy"]), accuracy, logits, RTOL)
  for member_accuracy in out["member_accuracies"]:
    equivalence.assert_accuracies_agree(float(member_accuracy), accuracy, logits, RTOL)
  equivalence.assert_close_normwise(out["loss"], single["loss"], equivalence.sum_rtol(3 * 360))
  probs = ensembles.compute_member_probabilities(model, stacked, {}, images, mean, std, 128)
  np.testing.assert_array_equal(probs[0], probs[1])
  # A second call with new values of the same shapes reuses the compiled program (other
  # tests may have compiled other shapes before: count only what this call adds).
  compiled = ensembles.compute_member_probabilities._cache_size()
  ensembles.compute_member_probabilities(model, stacked, {}, images + 1, mean, std, 128)
  assert ensembles.compute_member_probabilities._cache_size() == compiled


def test_ensemble_of_two_members_scores_the_mean_of_their_probabilities(digits):
  model = models.create_model("lenet300_100", 10)
  members = [_init(model, seed, digits) for seed in (1, 2)]
  images, labels, mean, std = _args(digits)
  out = ensembles.evaluate_ensemble(
    model, ensembles.stack_members(members), {}, images, labels, mean, std, 100
  )
  probs = [
    np.asarray(evaluation.compute_probabilities(model, {"params": p}, images, mean, std, 100))
    for p in members
  ]
  mean_probs = (probs[0] + probs[1]) / 2
  y = np.asarray(labels)
  expected_accuracy = np.mean(np.argmax(mean_probs, -1) == y)
  expected_loss = -np.mean(np.log(mean_probs[np.arange(len(y)), y] + 1e-12))
  assert float(out["accuracy"]) == pytest.approx(expected_accuracy, abs=1e-7)
  np.testing.assert_allclose(out["loss"], expected_loss, rtol=1e-5)
  for p, acc in zip(members, out["member_accuracies"], strict=True):
    single = evaluation.compute_metrics(model, {"params": p}, images, labels, mean, std, 100)
    logits = _logits(model, p, digits)
    equivalence.assert_accuracies_agree(float(acc), float(single["accuracy"]), logits, RTOL)
  # The two members disagree, so the test can tell a mean from either member.
  assert not np.allclose(probs[0], probs[1])


def test_ensemble_of_runs_members_are_the_runs_saved_round_models(tmp_path_factory):
  swamp_dir = get_saved_run("swamp", tmp_path_factory)
  imp_dir = get_saved_run("imp", tmp_path_factory)
  run = saved_runs.load_run(imp_dir)
  out = ensembles.evaluate_ensemble_of_runs([imp_dir, swamp_dir], 1, run.dataset, run.model)
  saved = [results.read_results(w)[1].test_accuracy for w in (imp_dir, swamp_dir)]
  # The ensemble's program and the run's evaluate the same models: equal up to near-ties.
  logits = [
    compute_test_logits(w, workdir_lib.load_round_model(w, 1)["params"])
    for w in (imp_dir, swamp_dir)
  ]
  for accuracy, expected, member_logits in zip(
    out["member_accuracies"], saved, logits, strict=True
  ):
    equivalence.assert_accuracies_agree(accuracy, expected, member_logits, LENET300_EVAL_RTOL)
  same = ensembles.evaluate_ensemble_of_runs([imp_dir, imp_dir], 1, run.dataset, run.model)
  equivalence.assert_accuracies_agree(same["accuracy"], saved[0], logits[0], LENET300_EVAL_RTOL)
  assert same["member_accuracies"] == [same["member_accuracies"][0]] * 2


def test_ensemble_of_runs_refuses_members_at_different_sparsities(tmp_path_factory, tmp_path):
  imp_dir = get_saved_run("imp", tmp_path_factory)
  run = saved_runs.load_run(imp_dir)
  saved = workdir_lib.load_round_model(imp_dir, 1)
  mask = jax.tree_util.tree_map(np.array, saved["mask"])
  mask["fc1"]["kernel"][np.nonzero(mask["fc1"]["kernel"])[0][0], :] = False
  out = imp.RoundOutput(saved["params"], saved["batch_stats"], None, {}, None, None)
  workdir_lib.save_round_model(str(tmp_path), 1, out, mask, with_particles=False)
  with pytest.raises(ValueError, match="not at one sparsity"):
    ensembles.evaluate_ensemble_of_runs([imp_dir, str(tmp_path)], 1, run.dataset, run.model)
