"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) in JAX/Flax.

Layers, each importing only the ones above it:
  errors, files, images, progress,         plain helpers
  config_schema, config_loading
  parallel                                 devices and processes: pmap axis, replicas, gathers
  tpu                                      TPU slice names -> compile-only devices
  diffusion/                               the process and its samplers (pure JAX)
  cpu/                                     opt-in XLA:CPU kernels (pure JAX)
  models/                                  the U-Net and Inception-v3 (Flax)
  data/                                    sources, step-derived order, iterators
  config_validation, host, workdirs        start-up checks and set-up
  training/                                state and builders, step, checkpoints, loop
  sample, evaluation/, convert/,           the programs main.py dispatches to
  compile_check
"""
