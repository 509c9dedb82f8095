"""The config schema: every field of every experiment, its comment, and the paper's CIFAR-10 values.

Every field any code reads is defined here, with a comment; a config with a
field that is not here, or without one that is, is refused
(``config_validation.check_fields``). It lives in the package, so that an
installed ddpm_jax can check a config; the experiment files of the repository
start from it through ``configs/default.py`` (``default.get_config()``) and
change what differs. Every field can be overridden on the command line:
``--config.training.batch_size=64``. Names follow the paper and its code.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # ---- data (ddpm_jax/data/) ----
  config.data = data = ml_collections.ConfigDict()
  # 'digits' | 'cifar10' | 'celeb_a_hq/256' | 'lsun/church_outdoor' | 'lsun/bedroom' | 'lsun/cat' | 'folder'
  data.dataset = "cifar10"
  # height = width of the training images, pixels
  data.image_size = 32
  # 3 (RGB) or 1 (grayscale: digits, grayscale folders)
  data.channels = 3
  # random horizontal flips of training images (paper: on for CIFAR-10)
  data.random_flip = True
  # TFDS data_dir ('' = TFDS default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
  data.data_dir = ""
  # image directory when dataset='folder'
  data.folder = ""
  # split used for training
  data.train_split = "train"
  # split used for bits/dim and test-set statistics
  data.eval_split = "test"
  # True: whole split in host memory, step-derived order (exact resume); False: tf.data streaming
  data.in_memory = True
  # seed of the data order and the flips
  data.shuffle_seed = 0
  # tf.data shuffle buffer (streaming sources only)
  data.shuffle_buffer_size = 10_000

  # ---- the U-Net (ddpm_jax/models/unet.py) ----
  config.model = model = ml_collections.ConfigDict()
  # base channel count (paper: 128)
  model.ch = 128
  # channel multiplier per resolution level (paper, 32x32: 1,2,2,2)
  model.ch_mult = (1, 2, 2, 2)
  # ResNet blocks per level (paper: 2)
  model.num_res_blocks = 2
  # resolutions with self-attention (paper: 16x16)
  model.attn_resolutions = (16,)
  # dropout in the ResNet blocks (paper: 0.1 for CIFAR-10)
  model.dropout = 0.1
  # strided conv down / conv after nearest up (paper: True)
  model.resamp_with_conv = True
  # 0: unconditional; K > 0: class-conditional on labels 0..K-1 (the U-Net gets K + 1 class
  # embeddings: index K is "no class", for classifier-free guidance; Ho & Salimans 2022)
  model.num_classes = 0
  # computation dtype: 'float32' or 'bfloat16' (params, norms, softmax stay float32)
  model.dtype = "float32"
  # rematerialise ResNet blocks in the backward pass (saves memory, costs compute)
  model.remat = False
  # True: ddpm_jax/cpu's kernels wherever a program is built for a CPU backend (XLA:CPU's plain
  # convs train far slower: docs/cpu_kernels.md), the plain Flax model for GPU and TPU;
  # False: the plain model everywhere (see ddpm_jax/cpu/__init__.py)
  model.cpu_kernels = True

  # ---- the diffusion process (ddpm_jax/diffusion/) ----
  config.diffusion = diffusion = ml_collections.ConfigDict()
  # T (paper: 1000)
  diffusion.num_timesteps = 1000
  # 'linear' | 'quad' | 'const' | 'jsd' | 'warmup10' | 'warmup50' | 'cosine'
  diffusion.beta_schedule = "linear"
  # beta_1 (paper: 1e-4)
  diffusion.beta_start = 1e-4
  # beta_T (paper: 0.02)
  diffusion.beta_end = 0.02
  # what the network predicts: 'eps' (paper) | 'x0' | 'xprev' | 'v'
  diffusion.model_mean_type = "eps"
  # 'fixedlarge' (sigma^2 = beta, paper's CIFAR-10) | 'fixedsmall' | 'learned' | 'learned_range'
  diffusion.model_var_type = "fixedlarge"
  # 'mse' (L_simple, paper) | 'kl' (the bound) | 'hybrid' (learned variances)
  diffusion.loss_type = "mse"

  # ---- optimisation (ddpm_jax/builders.py: create_optimizer) ----
  config.optim = optim = ml_collections.ConfigDict()
  # Adam learning rate after warm-up (paper: 2e-4 CIFAR-10, 2e-5 at 256x256)
  optim.lr = 2e-4
  # Adam beta1
  optim.beta1 = 0.9
  # Adam beta2
  optim.beta2 = 0.999
  # Adam epsilon
  optim.eps = 1e-8
  # linear learning-rate warm-up from 0 (paper: 5000)
  optim.warmup_steps = 5000
  # 0: constant rate after warm-up (paper); N > 0: half-cosine decay from lr to 0 at step N
  optim.decay_steps = 0
  # clip gradients to this global norm (paper: 1.0); 0 disables
  optim.grad_clip = 1.0
  # EMA of the parameters used for sampling (paper: 0.9999)
  optim.ema_decay = 0.9999

  # ---- training loop (ddpm_jax/training/) ----
  config.training = training = ml_collections.ConfigDict()
  # global batch over all devices and processes (paper: 128)
  training.batch_size = 128
  # total optimiser steps (paper: 800k for CIFAR-10)
  training.num_train_steps = 800_000
  # seed of the parameters and the per-example t/noise/dropout draws
  training.seed = 0
  # optimiser steps per host->device call, in one program; >1 cuts dispatch overhead
  training.steps_per_call = 1
  # how those steps are chained: 'scan' (lax.scan; compile time independent of steps_per_call) | 'unroll' | 'auto' (unroll where model.cpu_kernels applies: on a CPU; else scan)
  training.multi_step_loop = "auto"
  # averaging gradients over devices: 'flat' (one all-reduce of all of them concatenated) | 'tree' (one buffer per parameter; XLA combines) | 'auto' (flat where model.cpu_kernels applies: on a CPU; else tree)
  training.grad_all_reduce = "auto"
  # split each device's batch into this many micro-batches (same result, less memory)
  training.grad_accum_steps = 1
  # console + TensorBoard metrics every N steps (where several processes agree to stop on a signal)
  training.log_every_steps = 100
  # write a checkpoint every N steps (and always at the end)
  training.checkpoint_every_steps = 10_000
  # how many recent checkpoints to keep
  training.keep_checkpoints = 3
  # write a grid of EMA samples every N steps (0: never)
  training.sample_every_steps = 50_000
  # images in that grid
  training.num_grid_samples = 64
  # batches kept in flight on the devices
  training.prefetch = 2
  # non-finite loss/grads: 'skip' the update or 'stop' at once
  training.nan_policy = "skip"
  # stop after this many non-finite steps in a row
  training.max_consecutive_nonfinite = 10
  # testing only: the batch of this step is made NaN (-1: never)
  training.debug_poison_step = -1
  # class-conditional: probability of replacing an example's label by "no class" (Ho &
  # Salimans 2022's p_uncond; 0.1 usual), which trains the unconditional branch of guidance
  training.p_uncond = 0.1
  # how t is drawn: 'uniform' (Algorithm 1) | 'loss_aware' (t ~ sqrt(E[L_t^2]) of the last 10
  # losses per t, with a uniform floor, the loss weighted by 1 / (T p_t); Nichol & Dhariwal 2021)
  training.t_sampler = "uniform"

  # ---- sampling (--mode=sample, and the grids during training) ----
  config.sampling = sampling = ml_collections.ConfigDict()
  # 'ancestral' (Algorithm 2) | 'ddim' | 'dpm_solver++' (Lu et al. 2022, 2M: 10-20 steps) |
  # 'dpm_solver++_sde' (its SDE variant, fresh noise each step, Lu et al. 2022b: 20-50 steps)
  sampling.sampler = "ancestral"
  # 0: all T steps (ancestral, DDIM; dpm_solver++, dpm_solver++_sde: 20); else this many calls
  sampling.num_steps = 0
  # dpm_solver++(_sde): its steps 'uniform' in t or uniform in log-SNR ('logsnr')
  sampling.timestep_spacing = "uniform"
  # dpm_solver++(_sde): dynamic thresholding of each x0 prediction (Saharia et al. 2022)
  sampling.thresholding = False
  # class-conditional: guidance scale w, eps = (1 + w) eps(x, c) - w eps(x, no class)
  sampling.guidance_scale = 0.0
  # class-conditional: the class to draw, or -1 for the classes in turn
  sampling.class_label = -1
  # DDIM eta (0: deterministic)
  sampling.eta = 0.0
  # clip predicted x0 to [-1, 1] at each step (paper: True)
  sampling.clip_denoised = True
  # how many images --mode=sample writes
  sampling.num_samples = 64
  # images per sampling call over all local devices
  sampling.batch_size = 256
  # -1: latest checkpoint; otherwise that step
  sampling.checkpoint_step = -1
  # seed of the sampler noise
  sampling.seed = 1

  # ---- evaluation (--mode=eval_bpd, eval_fid, figures; ddpm_jax/evaluation/) ----
  config.eval = ev = ml_collections.ConfigDict()
  # images per bits/dim or feature batch over all local devices
  ev.batch_size = 256
  # 0: the whole eval split; otherwise its first N examples
  ev.num_examples = 0
  # seed of the bits/dim q(x_t|x0) draws and of the figures
  ev.seed = 0
  # samples for FID/IS (paper: 50,000)
  ev.num_fid_samples = 50_000
  # path of the converted Inception-v3 weights (.npz; '' = $DDPM_JAX_INCEPTION_WEIGHTS or the default path)
  ev.inception_weights = ""
  # directory of the cached FID reference statistics ('' = $DDPM_JAX_STATS_DIR or workdir/eval)
  ev.stats_dir = ""
  # figures: samples (progressive generation) and image pairs (interpolation)
  ev.figure_rows = 8
  # figures: about how many timesteps the progressive generation shows
  ev.figure_columns = 10
  # figures: the interpolation's latent timestep, the paper's 1-based t (0: T/2, the paper's 500 of 1000)
  ev.interp_t = 0
  # figures: mixing weights 0, 0.1, ..., 1
  ev.interp_lambdas = 11

  # ---- multi-host ----
  config.distributed = ml_collections.ConfigDict()
  # call jax.distributed.initialize() (TPU pods, several GPU hosts)
  config.distributed.initialize = False
  return config
