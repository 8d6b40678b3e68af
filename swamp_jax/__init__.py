"""swamp_jax: SWAMP (Sparse Weight Averaging with Multiple Particles) for IMP, in JAX/Flax."""

from swamp_jax.analyses.connectivity import (
  compute_barrier,
  compute_linear_connectivity,
  compute_particle_connectivity,
  compute_round_connectivity,
)
from swamp_jax.analyses.ensembles import evaluate_ensemble, evaluate_ensemble_of_runs
from swamp_jax.analyses.flatness import compute_hessian_trace, compute_round_hessian_trace
from swamp_jax.analyses.lottery_pools import compute_lottery_pool, compute_lottery_pool_of_run
from swamp_jax.analyses.mask_quality import retrain_on_mask, retrain_on_saved_mask
from swamp_jax.averaging import average_particles, interpolate
from swamp_jax.batchnorm import recompute_batch_stats
from swamp_jax.config import get_default_config, validate_config
from swamp_jax.datasets import Dataset, load_dataset
from swamp_jax.distributed import create_mesh
from swamp_jax.masking import (
  PruningRule,
  apply_mask,
  compute_mask,
  compute_prunable,
  compute_sparsity,
  create_dense_mask,
)
from swamp_jax.models import create_model, register_model
from swamp_jax.optimizers import MaskedState, create_learning_rate_schedule, masked
from swamp_jax.precision import MixedPrecisionModel, with_compute_dtype
from swamp_jax.results import RoundResult, SwampResult, read_results
from swamp_jax.rounds import RoundOutput, Ticket, compute_ticket, train_round
from swamp_jax.runner import run
from swamp_jax.saved_runs import load_run
from swamp_jax.streamed_batchnorm import StreamedRecompute
from swamp_jax.streamed_evaluation import HostEvaluation
from swamp_jax.streaming import ArraySource, TrainStream, iterate_host_batches
from swamp_jax.swa import SWAState
from swamp_jax.workdir import load_final_model, load_round_model

__all__ = [
  "ArraySource",
  "Dataset",
  "HostEvaluation",
  "MaskedState",
  "MixedPrecisionModel",
  "PruningRule",
  "RoundOutput",
  "RoundResult",
  "SWAState",
  "StreamedRecompute",
  "SwampResult",
  "Ticket",
  "TrainStream",
  "apply_mask",
  "average_particles",
  "compute_barrier",
  "compute_hessian_trace",
  "compute_linear_connectivity",
  "compute_lottery_pool",
  "compute_lottery_pool_of_run",
  "compute_mask",
  "compute_particle_connectivity",
  "compute_prunable",
  "compute_round_connectivity",
  "compute_round_hessian_trace",
  "compute_sparsity",
  "compute_ticket",
  "create_dense_mask",
  "create_learning_rate_schedule",
  "create_mesh",
  "create_model",
  "evaluate_ensemble",
  "evaluate_ensemble_of_runs",
  "get_default_config",
  "interpolate",
  "iterate_host_batches",
  "load_dataset",
  "load_final_model",
  "load_round_model",
  "load_run",
  "masked",
  "read_results",
  "recompute_batch_stats",
  "register_model",
  "retrain_on_mask",
  "retrain_on_saved_mask",
  "run",
  "train_round",
  "validate_config",
  "with_compute_dtype",
]
