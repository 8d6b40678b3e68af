"""Measures the streamed input pipeline (swamp_jax.streaming) against the in-device one.

  PYTHONPATH=. python experiments/bench_input.py --repeats 3 \
      --out experiments/results/input_pipeline.md

1. Images per host CPU-second (one core's worth) that the pipeline delivers
   for MNIST-, CIFAR- and ImageNet-shaped records (decoded from PNG / JPEG
   bytes, as TFDS stores them; ImageNet through the random-resized crop), and
   the images per second that a training step of N=4 particles consumes.
2. One MNIST epoch of LeNet-5 and of LeNet-300-100 with N=4 particles
   (batch 128), streamed over in-device: the time ratio, from one process
   (in-device and streamed epochs alternate, medians of the repeats).
3. Peak host memory (ru_maxrss) of a streamed training run over 10k and
   100k synthetic CIFAR-shaped records in an array_record file, each in a
   fresh process training the same number of steps.

CPU times are per process (threads included), so a shared machine slows the
wall clock but barely moves images per CPU-second.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from swamp_jax import data, datasets, imp, masking, models, optimizers, particles, streaming

N, BATCH = 4, 128
SHARED_TFDS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


class EncodedSource:
  """Synthetic records stored encoded (PNG or JPEG bytes), decoded on read like TFDS's."""

  def __init__(self, num: int, shape_fn, fmt: str, seed: int = 0, distinct: int = 256):
    rng = np.random.default_rng(seed)
    self.num, self.blobs = num, []
    for _ in range(min(num, distinct)):  # a pool of distinct encodings, reused
      h, w, c = shape_fn(rng)
      # Smooth images compress like photos (noise would not).
      base = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), c), dtype=np.uint8)
      image = Image.fromarray(base.squeeze(-1) if c == 1 else base).resize((w, h))
      buf = io.BytesIO()
      image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
      self.blobs.append(buf.getvalue())

  def __len__(self):
    return self.num

  def __getitem__(self, i):
    image = np.asarray(Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])))
    return {"image": image if image.ndim == 3 else image[..., None], "label": i % 10}


def _keys(n=N):
  return np.stack([np.asarray(imp.particle_key(0, 0, i), np.uint32) for i in range(n)])


def measure_pipeline(source, batch, steps, transform="none", repeats=3):
  """Median images per CPU-second and per wall-second of ``steps`` batches, timed from
  the first batch on (an epoch's permutation and pipeline start are paid once per epoch)."""
  per_cpu, per_wall = [], []
  for r in range(repeats):
    it = streaming.iterate_host_batches(
      source, _keys(), r * (steps + 1), (r + 1) * (steps + 1), batch, transform=transform
    )
    next(it)
    cpu, wall = time.process_time(), time.perf_counter()
    count = sum(x.shape[0] * x.shape[1] for x, _ in it)
    per_cpu.append(count / (time.process_time() - cpu))
    per_wall.append(count / (time.perf_counter() - wall))
  return statistics.median(per_cpu), statistics.median(per_wall)


def _setup(model_name, image_shape, num_examples):
  model = models.create_model(model_name, 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)
  params, bs = variables["params"], variables.get("batch_stats", {})
  mask = masking.create_dense_mask(params)
  tx = optimizers.masked(optax.sgd(0.05, momentum=0.9))
  spec = particles.StepSpec(BATCH, num_examples, False, 10**9, 1)
  keys = jnp.asarray(_keys())
  start = jax.jit(lambda: particles.create_particles(params, bs, mask, keys, tx))
  return model, tx, spec, mask, start


def measure_epochs(model_name, images, labels, source, repeats=3):
  """Median seconds of one epoch in-device and streamed (alternating), and their ratio."""
  n = len(labels)
  model, tx, spec, mask, start = _setup(model_name, images.shape[1:], n)
  programs = imp.create_round_programs(
    model, tx, spec, masking.compute_prunable(mask), imp.RoundSettings(0.2, False, 1, 1, 1)
  )
  mean, std = data.compute_channel_stats(*data.compute_channel_sums(images))
  device = particles.DeviceData(jnp.asarray(images), jnp.asarray(labels), mean, std)
  step = streaming.create_step_program(model, tx, spec)
  stream = streaming.TrainStream(source, BATCH, "none", 0, 0, mean, std, None, {"rounds": step})
  spe = data.steps_per_epoch(n, BATCH)
  times = {"device": [], "stream": []}
  for r in range(repeats + 1):  # the first repeat compiles and is dropped
    states = start()
    jax.block_until_ready(states)
    t = time.perf_counter()
    states, losses = programs.train(states, mask, device, imp.as_step(r * spe), num_steps=spe)
    jax.block_until_ready((states, losses))
    device_s = time.perf_counter() - t
    states = start()
    jax.block_until_ready(states)
    t = time.perf_counter()
    batches = stream.batches(_keys(), r * spe, (r + 1) * spe)
    states, losses = stream.train(False, states, mask, batches, r * spe, spe)
    jax.block_until_ready((states, losses))
    stream_s = time.perf_counter() - t
    if r:
      times["device"].append(device_s)
      times["stream"].append(stream_s)
  d, s = statistics.median(times["device"]), statistics.median(times["stream"])
  return d, s, s / d, spe


def measure_step_consumption(model_name, image_shape, repeats=3, steps=20):
  """Images per second one jitted streamed step of N particles consumes (data on device)."""
  model, tx, spec, mask, start = _setup(model_name, image_shape, BATCH * steps)
  step = streaming.create_step_program(model, tx, spec)
  images = jnp.zeros((steps, N, BATCH, *image_shape), jnp.uint8)
  labels = jnp.zeros((steps, N, BATCH), jnp.int32)
  mean, std = jnp.zeros(image_shape[-1]), jnp.ones(image_shape[-1])
  states = start()
  rates = []
  for r in range(repeats + 1):  # the first compiles
    t = time.perf_counter()
    states, losses = step(states, mask, np.int32(0), images, labels, mean, std)
    jax.block_until_ready(losses)
    if r:
      rates.append(N * BATCH * steps / (time.perf_counter() - t))
  return statistics.median(rates)


def write_array_record(path, num, shape=(32, 32, 3)):
  from array_record.python.array_record_module import ArrayRecordWriter

  rng = np.random.default_rng(0)
  writer = ArrayRecordWriter(path, "group_size:1")
  pool = rng.integers(0, 256, (64, *shape), dtype=np.uint8)
  for i in range(num):
    writer.write(pool[i % 64].tobytes() + bytes([i % 10]))
  writer.close()


class RawRecordSource:
  """Raw uint8 CIFAR-shaped records (image bytes + a label byte) in an array_record file."""

  def __init__(self, path, shape=(32, 32, 3)):
    import grain

    self.source, self.shape = grain.sources.ArrayRecordDataSource([path]), shape

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    raw = self.source[i]
    return {"image": np.frombuffer(raw[:-1], np.uint8).reshape(self.shape), "label": raw[-1]}


def memory_worker(path, steps):
  """(In a fresh process) streamed LeNet-5 training over the records at ``path``."""
  source = RawRecordSource(path)
  model, tx, spec, mask, start = _setup("lenet5", (32, 32, 3), len(source))
  step = streaming.create_step_program(model, tx, spec)
  mean, std = jnp.full(3, 127.0), jnp.full(3, 64.0)
  stream = streaming.TrainStream(source, BATCH, "none", 0, 0, mean, std, None, {"rounds": step})
  states, losses = stream.train(False, start(), mask, stream.batches(_keys(), 0, steps), 0, steps)
  jax.block_until_ready(losses)
  stats = jax.local_devices()[0].memory_stats() or {}
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(
    json.dumps({"host_peak_mib": peak_kib / 1024, "device_peak": stats.get("peak_bytes_in_use")})
  )


def measure_memory(sizes=(10_000, 100_000), steps=20):
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for num in sizes:
      path = os.path.join(tmp, f"records{num}.array_record")
      write_array_record(path, num)
      code = f"import bench_input as b; b.memory_worker({path!r}, {steps})"
      env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), *sys.path]),
      }
      proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
      )
      out[num] = json.loads(proc.stdout.strip().splitlines()[-1])
      out[num]["file_mib"] = os.path.getsize(path) / 2**20
  return out


def load_mnist():
  """MNIST's training split: decoded arrays and the TFDS array_record source (PNG records)."""
  import tensorflow_datasets as tfds

  data_dir = os.path.join(SHARED_TFDS, "tensorflow_datasets")
  ds = datasets.Dataset.from_tfds("mnist", data_dir, cache_dir=None)
  return (
    ds.train_images,
    ds.train_labels,
    tfds.data_source("mnist", split="train", data_dir=data_dir),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--sections", default="1,2,3", help="which measurements to run")
  parser.add_argument("--epoch-examples", type=int, default=60_000, help="MNIST rows per epoch")
  args = parser.parse_args()
  lines = [
    "# Input pipeline: streamed (grain) vs in-device",
    "",
    f"`python experiments/bench_input.py {' '.join(sys.argv[1:])}`, on "
    f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores, shared with other work while "
    f"it ran: load average {os.getloadavg()[0]:.1f} at the start). Medians of "
    f"{args.repeats} repeats; ratios come from one process. N={N} particles, batch {BATCH}.",
    "",
  ]

  def emit(text=""):
    print(text, flush=True)
    lines.append(text)

  for line in lines:
    print(line)
  sections = set(args.sections.split(","))
  mnist_images, mnist_labels, mnist_tfds = load_mnist()
  if "1" in sections:
    pipeline_section(emit, mnist_images, mnist_labels, mnist_tfds, args.repeats)
  if "2" in sections:
    epoch_section(emit, mnist_images, mnist_labels, args.epoch_examples, args.repeats)
  if "3" in sections:
    memory_section(emit)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


def pipeline_section(emit, mnist_images, mnist_labels, mnist_tfds, repeats):
  emit("## 1. Images the pipeline delivers per host CPU-second (worker_count=0)")
  emit("")
  emit("| records | stored as | pipeline images/CPU-s | images/wall-s |")
  emit("|---|---|---|---|")
  cases = [
    ("MNIST 28x28x1 (TFDS array_record)", mnist_tfds, BATCH, 20, "none", "PNG"),
    (
      "MNIST 28x28x1 (decoded numpy)",
      streaming.ArraySource(mnist_images, mnist_labels),
      BATCH,
      100,
      "none",
      "uint8 arrays",
    ),
    (
      "CIFAR 32x32x3 (synthetic)",
      EncodedSource(50_000, lambda r: (32, 32, 3), "PNG"),
      BATCH,
      40,
      "none",
      "PNG",
    ),
    (
      "ImageNet ~400x350x3 -> 224x224 (synthetic, random-resized crop + flip)",
      EncodedSource(
        50_000, lambda r: (int(r.integers(300, 500)), int(r.integers(300, 500)), 3), "JPEG"
      ),
      32,
      4,
      "imagenet",
      "JPEG q90",
    ),
  ]
  for name, source, batch, steps, transform, stored in cases:
    cpu, wall = measure_pipeline(source, batch, steps, transform, repeats)
    emit(f"| {name} | {stored} | {cpu:,.0f} | {wall:,.0f} |")
  emit("")
  emit("Images/s that one jitted training step of N=4 particles consumes (data already on device):")
  emit("")
  emit("| model | input | images/s consumed |")
  emit("|---|---|---|")
  for model_name, shape in [("lenet5", (28, 28, 1)), ("lenet300_100", (28, 28, 1))]:
    rate = measure_step_consumption(model_name, shape, repeats, steps=10)
    emit(f"| {model_name} | {'x'.join(map(str, shape))} | {rate:,.0f} |")
  emit("")


def epoch_section(emit, mnist_images, mnist_labels, m, repeats):
  x, y = mnist_images[:m], mnist_labels[:m]
  emit(f"## 2. One MNIST epoch ({m:,} images, {m // BATCH} steps), N=4: streamed / in-device")
  emit("")
  emit("The stream reads decoded MNIST held in host memory (streaming.ArraySource).")
  emit("")
  emit("| model | in-device s | streamed s | ratio |")
  emit("|---|---|---|---|")
  for model_name in ("lenet5", "lenet300_100"):
    d, s, ratio, _ = measure_epochs(model_name, x, y, streaming.ArraySource(x, y), repeats)
    emit(f"| {model_name} | {d:.2f} | {s:.2f} | {ratio:.2f}x |")
  emit("")


def memory_section(emit):
  emit("## 3. Peak host memory of a streamed run vs dataset size (20 steps of LeNet-5, N=4)")
  emit("")
  emit("| records (32x32x3 uint8, array_record) | file MiB | peak host RSS MiB |")
  emit("|---|---|---|")
  for num, m in measure_memory().items():
    emit(f"| {num:,} | {m['file_mib']:.0f} | {m['host_peak_mib']:.0f} |")
  emit("")
  emit(
    "Device memory: on this CPU the device is host memory (counted above); "
    f"memory_stats: {jax.local_devices()[0].memory_stats()}."
  )


if __name__ == "__main__":
  sys.exit(main())
