"""ImageNet's host-side augmentation, in numpy and PIL, for the streamed input pipeline.

Training: a random-resized crop (area 8%-100% of the image, aspect ratio
3/4-4/3, resized to ``size`` x ``size``, as torchvision's
``RandomResizedCrop`` and the Flax ImageNet example) and a horizontal flip
with probability 1/2. Evaluation: the shorter side resized to 256 and a
centered ``size`` x ``size`` crop. The randomness of one example is drawn from
a generator seeded by (particle key, epoch, example index), so a resumed run
crops every example exactly as an uninterrupted one, whatever worker
processes did the work.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
EVAL_RESIZE = 256
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Per-channel statistics of ImageNet's training images (torchvision, Flax examples),
# in the stored 0..255 scale: streamed ImageNet runs normalize with these instead of
# decoding 1.28M images to measure them.
IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32) * 255


def example_rng(key, epoch: int, example: int) -> np.random.Generator:
  """The generator of one example's augmentation: a pure function of its arguments.

  Args:
    key: the particle's data-order key, uint32 [2].
  """
  k = np.asarray(key, np.uint32)
  return np.random.default_rng([int(k[0]), int(k[1]), int(epoch), int(example)])


def sample_crop_box(height: int, width: int, rng: np.random.Generator):
  """(top, left, crop height, crop width) of a random-resized crop (torchvision's rule:
  10 tries at a random area and log-uniform ratio, else the center crop at the
  nearest allowed ratio)."""
  area = height * width
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  for _ in range(10):
    target = area * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < CROP_RATIO[0]:
    w, h = width, int(round(width / CROP_RATIO[0]))
  elif in_ratio > CROP_RATIO[1]:
    h, w = height, int(round(height * CROP_RATIO[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def random_resized_crop_and_flip(
  image: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
  """Training augmentation of one uint8 image [H, W, C] -> uint8 [size, size, C]."""
  top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng)
  out = _resize(image[top : top + h, left : left + w], size, size)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def resize_and_center_crop(
  image: np.ndarray, size: int = IMAGE_SIZE, resize: int = EVAL_RESIZE
) -> np.ndarray:
  """Evaluation transform of one uint8 image [H, W, C]: shorter side to ``resize``,
  then the centered ``size`` x ``size`` crop. Returns uint8 [size, size, C]."""
  height, width = image.shape[:2]
  scale = resize / min(height, width)
  h, w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
  resized = _resize(image, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return np.ascontiguousarray(resized[top : top + size, left : left + size])
