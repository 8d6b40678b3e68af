import jax
import numpy as np
import pytest

import swamp_jax
from swamp_jax import masking, results, saved_runs
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import mask_quality

from .saved_runs_for_analyses import get_saved_run


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_pruned_weights_are_zero(params, mask):
  for p, m in zip(_leaves(params), _leaves(mask), strict=True):
    assert np.all(p[~m] == 0)


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
  workdir = get_saved_run("imp", tmp_path_factory)
  config = saved_runs.load_config(workdir)
  return workdir, config, swamp_jax.compute_ticket(config)


def test_retraining_on_imps_own_mask_reproduces_the_imp_round(imp_run):
  workdir, config, ticket = imp_run
  saved = workdir_lib.load_round_model(workdir, 2)
  out = mask_quality.retrain_on_mask(config, saved["mask"], ticket, round_index=2)
  round2 = results.read_results(workdir)[2]
  assert out.test_accuracy == pytest.approx(round2.test_accuracy, abs=1e-6)
  assert out.validation_accuracy == pytest.approx(round2.validation_accuracy, abs=1e-6)
  assert out.sparsity == pytest.approx(round2.sparsity, abs=1e-12)
  for a, b in zip(_leaves(out.params), _leaves(saved["params"]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  _assert_pruned_weights_are_zero(out.params, saved["mask"])


def test_retraining_on_another_mask_keeps_it_and_its_sparsity(imp_run):
  _, config, ticket = imp_run
  # Not a magnitude mask of anything: a random mask keeping 30% of every kernel.
  rng = np.random.default_rng(0)
  prunable = masking.compute_prunable(ticket.params)
  mask = jax.tree_util.tree_map(
    lambda p, pr: rng.random(p.shape) < 0.3 if pr else np.ones(p.shape, bool),
    ticket.params,
    prunable,
  )
  out = mask_quality.retrain_on_mask(config, mask, ticket, round_index=1)
  assert out.sparsity == pytest.approx(masking.compute_sparsity(mask, prunable), abs=1e-12)
  assert 0.65 < out.sparsity < 0.75
  _assert_pruned_weights_are_zero(out.params, mask)
  assert 0.0 <= out.test_accuracy <= 1.0


def test_swamps_mask_is_retrained_from_imps_ticket(imp_run, tmp_path_factory):
  imp_dir, config, ticket = imp_run
  swamp_dir = get_saved_run("swamp", tmp_path_factory)
  swamp_config = saved_runs.load_config(swamp_dir)
  # The SWAMP config made IMP is the IMP run's config: one ticket for both masks.
  assert mask_quality.create_imp_config(swamp_config).to_dict() == config.to_dict()
  out = mask_quality.retrain_on_saved_mask(swamp_config, swamp_dir, 1, ticket)
  swamp_mask = workdir_lib.load_round_model(swamp_dir, 1)["mask"]
  imp_mask = workdir_lib.load_round_model(imp_dir, 1)["mask"]
  assert out.sparsity == pytest.approx(results.read_results(swamp_dir)[1].sparsity, abs=1e-12)
  _assert_pruned_weights_are_zero(out.params, swamp_mask)
  # The two runs prune differently: the comparison is not of one mask with itself.
  assert any(np.any(a != b) for a, b in zip(_leaves(swamp_mask), _leaves(imp_mask), strict=True))


def test_a_mask_that_does_not_fit_the_model_is_refused(imp_run):
  _, config, ticket = imp_run
  mask = jax.tree_util.tree_map(lambda p: np.ones(p.shape, bool), ticket.params)
  mask["fc1"]["kernel"] = np.ones((3, 3), bool)
  with pytest.raises(ValueError, match=r"mask: leaf \['fc1'\]\['kernel'\] has shape \(3, 3\)"):
    mask_quality.retrain_on_mask(config, mask, ticket)
  mask["fc1"]["kernel"] = np.ones(ticket.params["fc1"]["kernel"].shape, bool)
  params = {**ticket.params, "fc1": {**ticket.params["fc1"], "bias": np.zeros(3, np.float32)}}
  with pytest.raises(ValueError, match=r"ticket.params: leaf \['fc1'\]\['bias'\] has shape \(3,\)"):
    swamp_jax.train_round(config, ticket._replace(params=params), mask)
  with pytest.raises(ValueError, match="round_index must be an integer >= 0, got -1"):
    swamp_jax.train_round(config, ticket, mask, -1)
