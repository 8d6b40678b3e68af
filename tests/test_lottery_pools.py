import jax
import numpy as np
import pytest

from swamp_jax import saved_runs
from swamp_jax import workdir as workdir_lib
from swamp_jax.analyses import lottery_pools

from .saved_runs_for_analyses import get_saved_run


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def imp_round2(tmp_path_factory):
  workdir = get_saved_run("imp", tmp_path_factory)
  run = saved_runs.load_run(workdir)
  return workdir, run, workdir_lib.load_round_model(workdir, 2)


def test_pool_of_a_run_is_as_sparse_as_its_ticket_and_no_worse_on_validation(imp_round2):
  workdir, _, target = imp_round2
  out = lottery_pools.compute_lottery_pool_of_run(workdir, 2, coefficients=(0.25, 0.5))
  assert out["validation_accuracy"] >= out["ticket_validation_accuracy"]
  assert sum(out["weights"].values()) == pytest.approx(1.0)
  assert all(w > 0 for w in out["weights"].values()) and 2 in out["weights"]
  assert set(out["weights"]) <= {0, 1, 2}
  assert 0.0 <= out["test_accuracy"] <= 1.0


def test_pool_stays_under_the_target_mask(imp_round2):
  workdir, run, target = imp_round2
  denser = workdir_lib.load_round_model(workdir, 0)["params"]  # nonzero where round 2 prunes
  pool = lottery_pools.compute_lottery_pool(
    run.model, target["params"], [denser], {}, target["mask"], run.dataset, (1.0,), 512, 128
  )
  # Coefficient 1 would take the denser solution whole; the mask still holds.
  for p, m in zip(_leaves(pool.params), _leaves(target["mask"]), strict=True):
    assert np.all(p[~m] == 0)
  np.testing.assert_allclose(pool.weights.sum(), 1.0)


def test_pool_of_identical_candidates_is_the_target(imp_round2):
  _, run, target = imp_round2
  pool = lottery_pools.compute_lottery_pool(
    run.model,
    target["params"],
    [target["params"], target["params"]],
    {},
    target["mask"],
    run.dataset,
    (0.5,),
    512,
    128,
  )
  np.testing.assert_array_equal(pool.weights, [1.0, 0.0, 0.0])
  for a, b in zip(_leaves(pool.params), _leaves(target["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
