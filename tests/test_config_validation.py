"""ddpm_jax/config_validation.py: every bad setting is one line that names the field, at start-up."""

import pytest

from configs import test as test_config
from ddpm_jax import config_validation

IMAGE_EXTS = ".png, .jpg, .jpeg, .webp, .bmp"


def validation_error(num_devices=2, **overrides):
  config = test_config.get_config()
  for path, value in overrides.items():
    section, name = path.split("__")
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices, num_devices)
  return str(e.value)


def test_the_test_config_is_valid():
  config_validation.validate(test_config.get_config(), 2, 2)


def test_unknown_beta_schedule():
  assert validation_error(diffusion__beta_schedule="linearr") == (
      "config.diffusion.beta_schedule='linearr' is invalid: must be one of ('linear', 'quad', "
      "'const', 'jsd', 'warmup10', 'warmup50', 'cosine')"
  )


def test_batch_size_not_divisible_by_device_count():
  assert validation_error(training__batch_size=3) == (
      "config.training.batch_size=3 is invalid: must be divisible by the number of devices (2)"
  )


def test_image_size_too_small_for_unet_depth():
  assert validation_error(model__ch_mult=(1, 2, 2, 2, 2)) == (
      "config.data.image_size=8 is invalid: must be divisible by 2**(len(model.ch_mult)-1) = 16 "
      "(model.ch_mult=(1, 2, 2, 2, 2))"
  )


def test_cosine_decay_ending_inside_the_warmup():
  assert validation_error(optim__warmup_steps=100, optim__decay_steps=50) == (
      "config.optim.decay_steps=50 is invalid: must be 0 or above optim.warmup_steps (100)"
  )


def test_attention_resolution_not_in_unet():
  assert validation_error(model__attn_resolutions=(16,)) == (
      "config.model.attn_resolutions=(16,) is invalid: each must be one of the U-Net's "
      "resolutions [4, 8]"
  )


def test_class_settings_that_cannot_apply():
  assert validation_error(sampling__guidance_scale=2.0) == (
      "config.sampling.guidance_scale=2.0 is invalid: guides a class-conditional model: needs "
      "model.num_classes > 0"
  )
  assert validation_error(model__num_classes=10, sampling__class_label=10) == (
      "config.sampling.class_label=10 is invalid: must be -1 (classes in turn) or a class in "
      "[0, model.num_classes=10)"
  )
  assert validation_error(training__t_sampler="importance") == (
      "config.training.t_sampler='importance' is invalid: must be one of ('uniform', "
      "'loss_aware')"
  )


def test_unknown_dataset():
  assert validation_error(data__dataset="mnist") == (
      "config.data.dataset='mnist' is invalid: must be one of ('digits', 'cifar10', "
      "'celeb_a_hq/256', 'lsun/church_outdoor', 'lsun/bedroom', 'lsun/cat', 'folder')"
  )


def test_channels_do_not_fit_dataset():
  assert validation_error(data__channels=3) == (
      "config.data.channels=3 is invalid: digits are grayscale: 1"
  )


def test_ddim_steps_not_expressible_with_an_integer_stride():
  assert validation_error(sampling__sampler="ddim", sampling__num_steps=30) == (
      "config.sampling.num_steps=30 is invalid: sampler respacing 'ddim30': cannot make "
      "exactly 30 steps with an integer stride of 100"
  )


def test_sampler_steps_above_num_timesteps():
  assert validation_error(sampling__num_steps=101) == (
      "config.sampling.num_steps=101 is invalid: must be 0 (all) or at most "
      "diffusion.num_timesteps=100"
  )


def test_ddim_eta_out_of_range():
  assert validation_error(sampling__eta=1.5) == (
      "config.sampling.eta=1.5 is invalid: must be a number in [0.0, 1.0]"
  )


def test_nan_policy_unknown():
  assert validation_error(training__nan_policy="ignore") == (
      "config.training.nan_policy='ignore' is invalid: must be one of ('skip', 'stop')"
  )


def test_grad_all_reduce_unknown():
  assert validation_error(training__grad_all_reduce="ring") == (
      "config.training.grad_all_reduce='ring' is invalid: must be one of ('auto', 'flat', 'tree')"
  )


def test_max_consecutive_nonfinite_zero():
  assert validation_error(training__max_consecutive_nonfinite=0) == (
      "config.training.max_consecutive_nonfinite=0 is invalid: must be an integer >= 1"
  )


def test_folder_that_does_not_exist(tmp_path):
  missing = str(tmp_path / "missing")
  assert validation_error(data__dataset="folder", data__folder=missing) == (
      f"config.data.folder={missing!r} is invalid: must name an existing directory of images "
      "for dataset='folder'"
  )


def test_folder_without_image_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "notes.txt").write_text("no images here")
  assert validation_error(data__dataset="folder", data__folder=str(tmp_path)) == (
      f"config.data.folder={str(tmp_path)!r} is invalid: holds no image file ({IMAGE_EXTS}) "
      "in it or its subdirectories"
  )


def test_an_xprev_model_samples_with_all_steps_only():
  """x_{t-1} predicted for one step of T is not the mean of a respaced jump: refused by name."""
  expected = (
      "config.sampling.num_steps=10 is invalid: an 'xprev' model (diffusion.model_mean_type) "
      "predicts the mean of one of the 100 steps, so it samples with all of them only: use 0"
  )
  for sampler in ("ancestral", "ddim"):
    assert (
        validation_error(
            diffusion__model_mean_type="xprev", sampling__sampler=sampler, sampling__num_steps=10
        )
        == expected
    )
  for sampler, steps in (("ancestral", 0), ("ddim", 100), ("ancestral", 100)):
    config = test_config.get_config()
    config.diffusion.model_mean_type = "xprev"
    config.sampling.sampler, config.sampling.num_steps = sampler, steps
    config_validation.validate(config, 2, 2)


def test_settings_that_would_do_nothing_are_refused_by_name():
  assert validation_error(sampling__eta=0.5) == (
      "config.sampling.eta=0.5 is invalid: only the 'ddim' sampler uses it, not "
      "sampling.sampler='ancestral'; leave it 0"
  )
  for sampler in ("ancestral", "ddim"):
    assert validation_error(sampling__sampler=sampler, sampling__timestep_spacing="logsnr") == (
        "config.sampling.timestep_spacing='logsnr' is invalid: only the DPM-Solver++ samplers ('dpm_solver++' and "
        "'dpm_solver++_sde') use it, not "
        f"sampling.sampler={sampler!r}; leave it 'uniform'"
    )
    assert validation_error(sampling__sampler=sampler, sampling__thresholding=True) == (
        "config.sampling.thresholding=True is invalid: only the DPM-Solver++ samplers ('dpm_solver++' and "
        "'dpm_solver++_sde') use it, not "
        f"sampling.sampler={sampler!r} (which clips with sampling.clip_denoised); leave it False"
    )
  assert validation_error(eval__interp_t=101) == (
      "config.eval.interp_t=101 is invalid: must be 0 (T/2) or a timestep "
      "1..diffusion.num_timesteps=100"
  )
  assert validation_error(sampling__class_label=3) == (
      "config.sampling.class_label=3 is invalid: picks a class of a class-conditional model: "
      "needs model.num_classes > 0; leave it -1"
  )
  config = test_config.get_config()  # where they do something, they pass
  config.sampling.sampler, config.sampling.eta = "ddim", 0.5
  config.eval.interp_t = 100
  config_validation.validate(config, 2, 2)
  config.sampling.sampler, config.sampling.eta = "dpm_solver++", 0.0
  config.sampling.timestep_spacing, config.sampling.thresholding = "logsnr", True
  config_validation.validate(config, 2, 2)


def test_every_batch_the_devices_do_not_divide_is_named_at_once():
  config = test_config.get_config()
  config.training.batch_size, config.sampling.batch_size, config.eval.batch_size = 128, 256, 256
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, 6, 6, "HINT")
  assert str(e.value) == (
      "config.training.batch_size=128, config.sampling.batch_size=256 and "
      "config.eval.batch_size=256 are invalid: each must be divisible by the number of devices "
      "(6); HINT"
  )
  # The largest count that divides them all: the default on a 6- or 12-core machine.
  fits = {n: config_validation.devices_that_fit(config, n) for n in (6, 12, 16, 7, 1)}
  assert fits == {6: 4, 12: 8, 16: 16, 7: 4, 1: 1}
  # 8 processes of 16 devices split 128 (the sampling and eval batches would take 32).
  assert config_validation.devices_that_fit(config, 48, num_processes=8) == 16
  config.training.grad_accum_steps = 8  # each device's share must split into 8
  assert config_validation.devices_that_fit(config, 16) == 16
  assert config_validation.devices_that_fit(config, 32) == 16
