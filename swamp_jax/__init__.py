"""swamp_jax: SWAMP (Sparse Weight Averaging with Multiple Particles) for IMP, in JAX/Flax."""

from swamp_jax.averaging import average_particles, interpolate
from swamp_jax.batchnorm import recompute_batch_stats
from swamp_jax.config import get_default_config, validate_config
from swamp_jax.data import Dataset, load_dataset
from swamp_jax.masking import (
  apply_mask,
  compute_mask,
  compute_prunable,
  compute_sparsity,
  create_dense_mask,
)
from swamp_jax.models import create_model
from swamp_jax.optimizers import MaskedState, create_learning_rate_schedule, masked
from swamp_jax.results import RoundResult, SwampResult
from swamp_jax.runner import load_final_model, load_round_model, run
from swamp_jax.swa import SWAState

__all__ = [
  "Dataset",
  "MaskedState",
  "RoundResult",
  "SWAState",
  "SwampResult",
  "apply_mask",
  "average_particles",
  "compute_mask",
  "compute_prunable",
  "compute_sparsity",
  "create_dense_mask",
  "create_learning_rate_schedule",
  "create_model",
  "get_default_config",
  "interpolate",
  "load_dataset",
  "load_final_model",
  "load_round_model",
  "masked",
  "recompute_batch_stats",
  "run",
  "validate_config",
]
