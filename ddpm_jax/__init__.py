"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) in JAX/Flax.

Layers, top to bottom; a module imports only from the lines above its own
(and from its own package). tests/test_architecture.py holds the code to it.
  errors                                   the user-error kinds (one line each)
  files, progress                          atomic writes; rates and ETAs
  images                                   uint8 <-> [-1, 1], grids, PNGs
  summaries                                TensorBoard event files, written without TensorFlow
  config_schema, config_loading            every config field; reading a config file
  parallel, tpu                            devices, processes, pmap; TPU slices to compile for
  diffusion, cpu                           the process and its samplers; XLA:CPU kernels (pure JAX)
  models                                   the U-Net and Inception-v3 (Flax)
  data                                     sources, step-derived order, iterators
  config_validation                        every setting checked at start-up
  host, workdirs                           process set-up; what a workdir may hold
  checkpoints                              the TrainState and its files
  builders                                 model, processes, optimizer, EMA params of a workdir
  sample                                   the samplers over devices, sample files (--mode=sample)
  training, evaluation, convert            --mode=train; eval_bpd/eval_fid/figures; released weights
  compile_check                            --mode=compile: every program, for a TPU slice
"""
