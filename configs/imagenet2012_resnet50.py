r"""SWAMP on ImageNet (ILSVRC 2012) with ResNet-50: the co-author recipe of ../shared/SWAMP.md.

From the recipe (a JAX IMP lineage of the paper's authors): only the 4-D convolution kernels
are pruned (BatchNorm and the 2048x1000 `head` stay dense), one global magnitude threshold,
80% kept per round, 18 prunes (1.8% of the conv weights left, the last reference point); batch
2048, SGD with momentum 0.9 (not Nesterov), weight decay 1e-4, peak LR 0.8; 16k iterations to
the rewind point; 48k iterations per round on a cosine schedule with a 10% linear warm-up.
With 1,281,167 training images, an epoch is 625 steps of 2048 (the last partial batch is
dropped), so in whole epochs: rewind 26 epochs = 16,250 steps (16k: 25.6 epochs), rounds of
77 epochs = 48,125 steps (48k: 76.8 epochs), warm-up 7.68 epochs = exactly 4,800 steps.

Ours, not the recipe's:
  * the learning rate follows swamp_jax's IMP-with-rewinding schedule: one cosine over the
    whole run (steps 0..T), the dense phase trains steps 0..T0 of it (not a constant 0.8),
    and every round resumes it at T0 (about 0.71 there with SWA, 0.68 without), where the
    recipe starts a fresh cosine from 0.8 each cycle; the warm-up (4,800 steps) restarts at
    the start of the dense phase and of every round, as the recipe's does every cycle;
  * SWA from 75% of each round at a constant 0.4: the paper's CIFAR ratio of SWA to peak LR
    (0.05 / 0.1) applied to 0.8; --config.swa.enabled=False gives the recipe's plain IMP;
  * bfloat16 compute on the accelerators (float32 weights, optimizer state, averages and
    masks); --config.model.dtype=float32 computes in float32.

Data: TFDS `imagenet2012` is a manual download. Register at https://image-net.org/download-images,
put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (not the unlabelled test tar) into
TFDS's manual_dir, by default `<data_dir>/downloads/manual/`, and prepare the array_record
files once (about 150 GB):

  tfds build imagenet2012 --data_dir=/data/tensorflow_datasets \
      --manual_dir=/data/imagenet_tars --file_format=array_record

ImageNet's labelled held-out set is TFDS's 'validation' split: it is this run's test set
(`dataset.test_split`), and the training set is streamed (`dataset.pipeline`), never decoded
whole into memory. Launch on one host with accelerators (see the README's "Paper-scale runs"
for pods and clusters):

  python -m swamp_jax --config configs/imagenet2012_resnet50.py \
      --workdir /data/runs/imagenet2012_resnet50 \
      --config.dataset.data_dir=/data/tensorflow_datasets
  # IMP baseline:  --config.num_particles=1 --config.swa.enabled=False
"""

from swamp_jax.config import get_default_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167
BATCH_SIZE = 2048
STEPS_PER_EPOCH = IMAGENET_TRAIN_EXAMPLES // BATCH_SIZE  # 625


def get_config():
  c = get_default_config()
  c.dataset.name = "imagenet2012"
  c.dataset.cache_dir = ""  # 140 GB decoded: no array cache
  c.dataset.test_split = "validation"  # ImageNet's labelled held-out set
  c.dataset.pipeline = "stream"  # never decoded whole: grain reads and crops on the host
  c.dataset.stream_workers = 16  # host processes decoding JPEGs and cropping

  c.model.name = "resnet50"
  c.model.conv_impl = "auto"  # XLA's conv on GPU/TPU
  c.model.dtype = "bfloat16"

  c.num_particles = 4
  c.num_rounds = 18  # 0.8^18 = 1.8% of the conv weights left
  c.prune_fraction = 0.2
  c.prune_leaves = ("kernel",)
  c.prune_exclude = ("^head/",)  # the classifier's 2-D kernel; conv kernels are all others

  c.batch_size = BATCH_SIZE
  c.rewind_epochs = 26  # 16,250 steps (recipe: 16k)
  c.epochs_per_round = 77  # 48,125 steps (recipe: 48k)

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.8
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_epochs = 7.68  # 4,800 steps = 10% of 48k

  c.swa.enabled = True
  c.swa.start = 0.75
  c.swa.learning_rate = 0.4
  c.swa.every_epochs = 1

  c.eval_batch_size = 1000
  c.checkpoint.every_steps = 1000
  return c
