"""Evaluation of a streamed run from host memory, one batch on the device at a time.

An in-device run's ``finish`` evaluates the test and validation sets it holds in
device memory (``imp.compute_split_sums``). A streamed run keeps them on the
host (ImageNet's 50,000 evaluation crops are 7.5 GB, too much for every
device): each ``eval_batch_size`` batch, the last one padded with rows of
weight 0, goes to the device and one jitted program
(``imp.add_evaluation_sums``: the average with both statistics, every
particle's solution lifted over the particle axis) adds its sums to the
totals, batch after batch in the in-device order. ``imp.name_split_metrics``
turns them into the metrics ``finish`` reports, the same names and math.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from swamp_jax import imp


def iterate_eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """(images [batch_size, ...], int32 labels [batch_size], bool weights [batch_size]) host
  batches of a split, in order; the last one padded with zero rows of weight False."""
  n = len(labels)
  for start in range(0, n, batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(y)
    weights = np.arange(batch_size) < len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    yield x, np.asarray(y, np.int32), weights


@dataclasses.dataclass(frozen=True)
class HostEvaluation:
  """``__call__(out, eval_data, mean, std)`` -> the split metrics of ``finish`` for the
  models of ``out`` (``imp.RoundOutput``), ``eval_data`` in host memory."""

  batch_size: int
  settings: imp.RoundSettings
  placement: Any
  add: Any  # jitted imp.add_evaluation_sums, totals donated
  replicate: Any  # with a mesh, a jitted identity onto every device: every process reads all

  def _put(self, batch):
    if self.placement is None:
      return jax.device_put(batch)
    return self.placement.replicate(batch)

  def __call__(self, out: imp.RoundOutput, eval_data: imp.EvalData, mean, std) -> dict:
    n = jax.tree_util.tree_leaves(out.particle_params)[0].shape[0]
    recompute_average = self.settings.recomputes_average(n)
    models = out._replace(next_mask=None, metrics={})
    metrics = {}
    for split, images, labels in imp.list_eval_splits(eval_data):
      images, labels = np.asarray(images), np.asarray(labels)
      totals = imp.create_evaluation_sums(models)
      for batch in iterate_eval_batches(images, labels, self.batch_size):
        totals = self.add(totals, models, *self._put(batch), mean, std)
      metrics.update(imp.name_split_metrics(split, totals, len(labels), recompute_average))
    # The particles' metrics are split over the mesh as the particles are (over processes, in
    # a run of several); finish reports them replicated, as the in-device finish does.
    return metrics if self.replicate is None else self.replicate(metrics)


def create_host_evaluation(model, settings: imp.RoundSettings, placement=None) -> HostEvaluation:
  """A ``HostEvaluation`` in batches of ``settings.eval_batch_size``, its program jitted."""
  add = jax.jit(
    functools.partial(imp.add_evaluation_sums, model=model, placement=placement),
    donate_argnums=(0,),
  )
  replicate = None
  if placement is not None:
    replicate = jax.jit(lambda metrics: metrics, out_shardings=placement.replicated)
  return HostEvaluation(settings.eval_batch_size, settings, placement, add, replicate)
