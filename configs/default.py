"""Fields shared by every experiment, with the paper's CIFAR-10 values as defaults.

Each experiment file (cifar10.py, digits.py, ...) starts from ``get_config()``
here and changes what differs. Every field can be overridden on the command
line: ``--config.training.batch_size=64``. Names follow the paper and its code.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # ---- data (ddpm_jax/input_pipeline.py) ----
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"        # 'digits' | 'cifar10' | 'celeb_a_hq/256' | 'lsun/church_outdoor' | 'lsun/bedroom' | 'lsun/cat' | 'folder'
  data.image_size = 32            # height = width of the training images, pixels
  data.channels = 3               # 3 (RGB) or 1 (grayscale: digits, grayscale folders)
  data.random_flip = True         # random horizontal flips of training images (paper: on for CIFAR-10)
  data.data_dir = ""              # TFDS data_dir ('' = TFDS default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
  data.folder = ""                # image directory when dataset='folder'
  data.train_split = "train"      # split used for training
  data.eval_split = "test"        # split used for bits/dim and test-set statistics
  data.in_memory = True           # True: whole split in host memory, step-derived order (exact resume); False: tf.data streaming
  data.shuffle_seed = 0           # seed of the data order and the flips
  data.shuffle_buffer_size = 10_000  # tf.data shuffle buffer (streaming sources only)

  # ---- the U-Net (ddpm_jax/models/unet.py) ----
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128                  # base channel count (paper: 128)
  model.ch_mult = (1, 2, 2, 2)    # channel multiplier per resolution level (paper, 32x32: 1,2,2,2)
  model.num_res_blocks = 2        # ResNet blocks per level (paper: 2)
  model.attn_resolutions = (16,)  # resolutions with self-attention (paper: 16x16)
  model.dropout = 0.1             # dropout in the ResNet blocks (paper: 0.1 for CIFAR-10)
  model.resamp_with_conv = True   # strided conv down / conv after nearest up (paper: True)
  model.num_classes = 0           # 0: unconditional (the only setting main.py runs; the U-Net alone also takes labels)
  model.dtype = "float32"         # computation dtype: 'float32' or 'bfloat16' (params, norms, softmax stay float32)
  model.remat = False             # rematerialise ResNet blocks in the backward pass (saves memory, costs compute)

  # ---- the diffusion process (ddpm_jax/diffusion.py) ----
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000      # T (paper: 1000)
  diffusion.beta_schedule = "linear"  # 'linear' | 'quad' | 'const' | 'jsd' | 'warmup10' | 'warmup50' | 'cosine'
  diffusion.beta_start = 1e-4         # beta_1 (paper: 1e-4)
  diffusion.beta_end = 0.02           # beta_T (paper: 0.02)
  diffusion.model_mean_type = "eps"   # what the network predicts: 'eps' (paper) | 'x0' | 'xprev' | 'v'
  diffusion.model_var_type = "fixedlarge"  # 'fixedlarge' (sigma^2 = beta, paper's CIFAR-10) | 'fixedsmall' | 'learned' | 'learned_range'
  diffusion.loss_type = "mse"         # 'mse' (L_simple, paper) | 'kl' (the bound) | 'hybrid' (learned variances)

  # ---- optimisation (ddpm_jax/train.py) ----
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4                 # Adam learning rate after warm-up (paper: 2e-4 CIFAR-10, 2e-5 at 256x256)
  optim.beta1 = 0.9               # Adam beta1
  optim.beta2 = 0.999             # Adam beta2
  optim.eps = 1e-8                # Adam epsilon
  optim.warmup_steps = 5000       # linear learning-rate warm-up from 0 (paper: 5000)
  optim.grad_clip = 1.0           # clip gradients to this global norm (paper: 1.0); 0 disables
  optim.ema_decay = 0.9999        # EMA of the parameters used for sampling (paper: 0.9999)

  # ---- training loop ----
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128       # global batch over all devices and processes (paper: 128)
  training.num_train_steps = 800_000  # total optimiser steps (paper: 800k for CIFAR-10)
  training.seed = 0               # seed of the parameters and the per-example t/noise/dropout draws
  training.steps_per_call = 1     # optimiser steps per host->device call, in one program; >1 cuts dispatch overhead
  training.multi_step_loop = "auto"  # how those steps are chained: 'scan' (lax.scan; compile time independent of steps_per_call) | 'unroll' | 'auto' (unroll on CPU, where scan ran 2-9x slower; scan elsewhere)
  training.grad_all_reduce = "auto"  # averaging gradients over devices: 'flat' (one all-reduce of all of them concatenated) | 'tree' (one buffer per parameter; XLA combines) | 'auto' (flat on CPU, where it made the 1.1M U-Net's step 1.05x faster; tree elsewhere)
  training.grad_accum_steps = 1   # split each device's batch into this many micro-batches (same result, less memory)
  training.log_every_steps = 100  # console + TensorBoard metrics every N steps
  training.checkpoint_every_steps = 10_000  # write a checkpoint every N steps (and always at the end)
  training.keep_checkpoints = 3   # how many recent checkpoints to keep
  training.sample_every_steps = 50_000  # write a grid of EMA samples every N steps (0: never)
  training.num_grid_samples = 64  # images in that grid
  training.prefetch = 2           # batches kept in flight on the devices
  training.nan_policy = "skip"    # non-finite loss/grads: 'skip' the update or 'stop' at once
  training.max_consecutive_nonfinite = 10  # stop after this many non-finite steps in a row
  training.debug_poison_step = -1  # testing only: the batch of this step is made NaN (-1: never)

  # ---- sampling (--mode=sample, and the grids during training) ----
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ancestral"  # 'ancestral' (Algorithm 2) | 'ddim'
  sampling.num_steps = 0          # 0: all T steps; otherwise a respaced sampler with this many steps
  sampling.eta = 0.0              # DDIM eta (0: deterministic)
  sampling.clip_denoised = True   # clip predicted x0 to [-1, 1] at each step (paper: True)
  sampling.num_samples = 64       # how many images --mode=sample writes
  sampling.batch_size = 256       # images per sampling call over all local devices
  sampling.checkpoint_step = -1   # -1: latest checkpoint; otherwise that step
  sampling.seed = 1               # seed of the sampler noise
  sampling.cpu_compile_options = True  # CPU only: compile samplers and eval_bpd with ddpm_jax.compile_options (faster)

  # ---- evaluation (--mode=eval_bpd, eval_fid) ----
  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 256             # images per bits/dim or feature batch over all local devices
  ev.num_examples = 0             # 0: the whole eval split; otherwise its first N examples
  ev.num_fid_samples = 50_000     # samples for FID/IS (paper: 50,000)
  ev.inception_weights = ""       # path of the converted Inception-v3 weights (.npz)

  # ---- the host process (main.py, ddpm_jax/host_malloc.py) ----
  config.host = host = ml_collections.ConfigDict()
  host.malloc = "auto"            # C allocator of a single-process CPU run, applied by main.py restarting itself once: 'auto' (jemalloc if installed, else 'glibc_thp') | 'jemalloc' | 'glibc_thp' (glibc with huge pages) | 'system'

  # ---- multi-host ----
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False  # call jax.distributed.initialize() (TPU pods, several GPU hosts)
  return config
