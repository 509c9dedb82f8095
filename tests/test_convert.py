"""Tests for ddpm_jax.convert: diffusers UNet2DModel weights -> our Flax U-Net.

The reference is diffusers itself (PyTorch, CPU): a UNet2DModel with the
released models' configs and random weights is saved with ``save_pretrained``,
converted, and both networks are run on the same inputs. Every parameter is
re-drawn at random (fan-in scaled, norms ~1, biases ~0.1) so that no layer is
zero or identity and a wrong mapping (q/k swapped, a transpose missed, up
levels reversed) changes the output.

Needs torch and diffusers (requirements-dev.txt).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddpm_jax import errors  # pylint: disable=g-import-not-at-top
from ddpm_jax.convert import diffusers as convert  # pylint: disable=g-import-not-at-top
from ddpm_jax.models.unet import count_params  # pylint: disable=g-import-not-at-top
from ddpm_jax import builders, checkpoints  # pylint: disable=g-import-not-at-top
from helpers import run_python  # pylint: disable=g-import-not-at-top

# The released models' UNet2DModel settings (config.json of google/ddpm-*).
COMMON = dict(
    in_channels=3,
    out_channels=3,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    norm_eps=1e-6,
    attention_head_dim=None,
    norm_num_groups=32,
    act_fn="silu",
)
CIFAR10 = dict(
    COMMON,
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
LSUN256 = dict(
    COMMON,
    sample_size=256,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)
# A small model with every kind of block (attention down, middle and up; a
# channel change; down/upsampling), for the sampling and error tests.
SMALL = dict(
    COMMON,
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """PyTorch's CPU thread pool spins against XLA's (and any other process): with
  two threads on two busy cores a small forward pass took 100x longer. One thread
  keeps the reference runs fast and predictable."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _torch_unet(unet_kwargs: dict, seed: int = 0, scale: float = 1.0):
  """A diffusers UNet2DModel with every parameter random (see the module docstring)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**unet_kwargs).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("weight") and p.ndim >= 2:  # conv / linear: fan-in scaled
        p.copy_(scale * noise / math.sqrt(p[0].numel()))
      elif name.endswith("weight"):  # GroupNorm scale
        p.copy_(1.0 + 0.1 * noise)
      else:  # biases
        p.copy_(0.1 * noise)
  return model


def _save(model, folder: str) -> str:
  model.save_pretrained(folder, safe_serialization=True)
  return folder


def _torch_forward(model, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(
        torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
        torch.from_numpy(t.astype(np.int64)),
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _jax_forward(config, params):
  """fn(x, t) -> the converted model's output.

  The parameters are an argument of the jitted function, not constants closed
  over: embedded in the program, the 256x256 model's 0.45 GB made XLA's
  compile most of that test's time.
  """
  model = builders.build_model(config)
  fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  return lambda x, t: fwd(params, x, t)


def _compare_forward(unet_kwargs, tmp_path, folder_name, config_name, batch, ts_list, seed):
  """Converts a random diffusers model and returns (max abs diff, output scale, config, params, model)."""
  tmodel = _torch_unet(unet_kwargs, seed=seed)
  src = _save(tmodel, str(tmp_path / folder_name))
  config, params, _ = convert.convert(src, None, config_name, verbose=False)
  n_torch = sum(p.numel() for p in tmodel.parameters())
  assert count_params(params) == n_torch
  fwd = _jax_forward(config, params)
  hw = unet_kwargs["sample_size"]
  rng = np.random.RandomState(seed)
  worst, scale = 0.0, 0.0
  for ts in ts_list:
    x = rng.standard_normal((batch, hw, hw, 3)).astype(np.float32)
    t = np.asarray(ts, np.int32)
    ref = _torch_forward(tmodel, x, t)
    ours = np.asarray(fwd(jnp.asarray(x), jnp.asarray(t)))
    assert ours.shape == ref.shape == (batch, hw, hw, 3)
    worst = max(worst, float(np.max(np.abs(ours - ref))))
    scale = max(scale, float(np.max(np.abs(ref))))
  return worst, scale, config, params, tmodel


# ----------------------------------------------------------------------------
# The released architectures: same outputs
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar10_architecture_matches_diffusers(tmp_path):
  # The folder name picks configs/ddpm_cifar10.py, as for a downloaded google/ddpm-cifar10-32.
  worst, scale, config, params, _ = _compare_forward(
      CIFAR10,
      tmp_path,
      "ddpm-cifar10-32",
      None,
      batch=2,
      ts_list=[(0, 999), (1, 500), (250, 17)],
      seed=0,
  )
  print(f"CIFAR-10 U-Net: max |ours - diffusers| = {worst:.3g} (outputs up to {scale:.3g})")
  assert scale > 0.5  # the random weights give O(1) outputs: the comparison bites
  assert worst < 1e-4
  assert count_params(params) == 35_746_307  # the paper's CIFAR-10 model
  assert config.model.ch_mult == (1, 2, 2, 2) and tuple(config.model.attn_resolutions) == (16,)
  assert config.diffusion.model_var_type == "fixedlarge"


@pytest.mark.slow
def test_256_architecture_matches_diffusers(tmp_path):
  worst, scale, config, params, _ = _compare_forward(
      LSUN256, tmp_path, "ddpm-church-256", "ddpm_church256", batch=1, ts_list=[(500,)], seed=1
  )  # one t: the time embedding is checked at many t above
  print(f"256x256 U-Net: max |ours - diffusers| = {worst:.3g} (outputs up to {scale:.3g})")
  assert scale > 0.5
  assert worst < 1e-4
  assert count_params(params) == 113_673_219
  assert tuple(config.model.attn_resolutions) == (16,)


# ----------------------------------------------------------------------------
# A whole sampling trajectory against diffusers' DDPMScheduler
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_ancestral_sampling_matches_ddpm_scheduler(tmp_path):
  """1000 steps of Algorithm 2 with the same x_T and the same per-step noise.

  diffusers draws step t's noise (t > 0 only) as ``torch.randn(shape,
  generator=g)`` (``randn_tensor`` on CPU), so the same sequence is pre-drawn
  from an identically seeded generator and fed to our loop. Conventions:
  diffusers' 'fixed_large' at t = 0 is beta_0, ours is beta~_1 (the paper's
  code); neither adds noise at t = 0, so the samples are the same. x0_hat is
  clipped to [-1, 1] in both (clip_sample / clip_denoised).
  """
  B, hw = 2, SMALL["sample_size"]
  tmodel = _torch_unet(SMALL, seed=3, scale=0.5)
  src = _save(tmodel, str(tmp_path / "small"))
  config, params, _ = convert.convert(src, None, None, verbose=False)
  assert config.diffusion.model_var_type == "fixedlarge"
  T = config.diffusion.num_timesteps
  assert T == 1000

  shape_nchw = (B, 3, hw, hw)
  x_T = torch.randn(shape_nchw, generator=torch.Generator().manual_seed(10))
  noise_gen = torch.Generator().manual_seed(11)
  z = np.zeros((T,) + shape_nchw, np.float32)  # z[t]: the noise of step t; none at t = 0
  pre = torch.Generator().manual_seed(11)
  for t in range(T - 1, 0, -1):
    z[t] = torch.randn(shape_nchw, generator=pre).numpy()

  # diffusers
  sched = diffusers.DDPMScheduler(
      num_train_timesteps=1000,
      beta_schedule="linear",
      variance_type="fixed_large",
      clip_sample=True,
  )
  sched.set_timesteps(1000)
  assert list(sched.timesteps.numpy()) == list(range(T - 1, -1, -1))
  x = x_T.clone()
  ref_traj = []  # x_{t-1} after each step, t = T-1 .. 0
  with torch.no_grad():
    for t in sched.timesteps:
      eps = tmodel(x, t).sample
      x = sched.step(eps, t, x, generator=noise_gen).prev_sample
      ref_traj.append(x.numpy().transpose(0, 2, 3, 1))
  ref_traj = np.stack(ref_traj)

  # ours: GaussianDiffusion.p_mean_variance with the given noise, one lax.scan
  model = builders.build_model(config)
  diffusion = builders.build_diffusion(config)
  zs = jnp.asarray(z[::-1].transpose(0, 1, 3, 4, 2))  # in step order t = T-1 .. 0, NHWC

  @jax.jit
  def sample(params, x_T, zs):
    def step(x, inp):
      t_scalar, z_t = inp
      t = jnp.full((B,), t_scalar, jnp.int32)
      out = diffusion.p_mean_variance(
          model.apply({"params": params}, x, t), x, t, clip_denoised=True
      )
      nonzero = (t_scalar > 0).astype(x.dtype)
      x = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z_t
      return x, x

    _, traj = jax.lax.scan(step, x_T, (jnp.arange(T - 1, -1, -1, dtype=jnp.int32), zs))
    return traj

  traj = np.asarray(sample(params, jnp.asarray(x_T.numpy().transpose(0, 2, 3, 1)), zs))
  final = float(np.max(np.abs(traj[-1] - ref_traj[-1])))
  # x_1 (before the last, noiseless step) is not clipped: a check that does not
  # rest on the final samples, many of which sit at the clip bounds +-1.
  x1 = float(np.max(np.abs(traj[-2] - ref_traj[-2])))
  whole = float(np.max(np.abs(traj - ref_traj)))
  print(
      f"1000-step ancestral sampling: max |ours - diffusers| = {final:.3g} at x_0, "
      f"{x1:.3g} at x_1, {whole:.3g} over the trajectory; "
      f"{np.mean(np.abs(ref_traj[-1]) == 1.0):.0%} of x_0 at +-1, x_1 in "
      f"[{ref_traj[-2].min():.2f}, {ref_traj[-2].max():.2f}]"
  )
  assert np.abs(ref_traj[-2]).max() > 0.5
  # Tolerance (measured: ~4e-5): diffusers builds its tables in float32 (betas by
  # torch.linspace, alpha_bar by a float32 cumprod: ~1e-5 relative error near
  # t = 1000, where 1/sqrt(alpha_bar) ~ 160), ours are float64 rounded once; those
  # differences and float32 rounding in the network accumulate over 1000 steps.
  assert whole < 5e-4


# ----------------------------------------------------------------------------
# Errors: unsupported configs, missing / extra tensors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("norm_eps", 1e-5),
        ("norm_num_groups", 16),
        ("act_fn", "gelu"),
        ("attention_head_dim", 8),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("center_input_sample", True),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),  # attention at another level than down
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
        ("block_out_channels", [32, 48]),
        ("sample_size", 9),  # not divisible by 2**(levels-1)
        ("num_class_embeds", 10),
        ("out_channels", 4),
    ],
)
def test_unsupported_config_names_the_key(key, value):
  cfg = dict(convert.DIFFUSERS_UNET_DEFAULTS)
  cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in SMALL.items()})
  convert.model_fields_from_diffusers(cfg)  # the base is fine
  cfg[key] = value
  with pytest.raises(convert.UnsupportedConfigError) as e:
    convert.model_fields_from_diffusers(cfg)
  assert e.value.key == key
  assert key in str(e.value)


def test_missing_key_takes_the_diffusers_default(tmp_path):
  """A key missing from config.json is checked at diffusers' default (here padding=1)."""
  folder = tmp_path / "m"
  folder.mkdir()
  cfg = {k: v for k, v in SMALL.items() if k != "downsample_padding"}
  (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DModel")))
  with pytest.raises(convert.UnsupportedConfigError, match="downsample_padding=1"):
    convert.model_fields_from_diffusers(convert.load_unet_config(str(folder)))
  # Keys diffusers does not know are ignored (with a warning), as diffusers does.
  (folder / "config.json").write_text(json.dumps(dict(SMALL, some_future_key=1)))
  assert convert.model_fields_from_diffusers(convert.load_unet_config(str(folder)))["ch"] == 32


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
  """(folder, torch model) of the small random model."""
  tmodel = _torch_unet(SMALL, seed=5)
  folder = str(tmp_path_factory.mktemp("small") / "unet")
  return _save(tmodel, folder), tmodel


def _rewrite(src: str, dst, edit) -> str:
  """Copy of the model folder with ``edit(tensors)`` applied to its tensors."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(cfg)
  tensors = load_file(os.path.join(src, convert.WEIGHTS_NAME))
  edit(tensors)
  save_file(tensors, os.path.join(dst, convert.WEIGHTS_NAME))
  return str(dst)


def test_missing_and_extra_tensors_are_listed(small_folder, tmp_path):
  src, _ = small_folder

  def edit(t):
    del t["up_blocks.0.attentions.1.to_k.bias"]
    del t["down_blocks.1.resnets.0.conv_shortcut.weight"]
    t["up_blocks.0.attentions.1.extra_proj.weight"] = np.zeros((64, 64), np.float32)
    t["mid_block.resnets.0.conv1.weight"] = np.zeros((64, 64, 1, 3), np.float32)

  bad = _rewrite(src, tmp_path / "bad", edit)
  with pytest.raises(convert.WeightMappingError) as e:
    convert.convert(bad, None, None, verbose=False)
  err = e.value
  assert len(err.missing) == 2  # diffusers up_blocks.0 is our up level L-1-0 = 1
  assert any(
      "up_1_attn_1/k/bias" in m and "up_blocks.0.attentions.1.to_k.bias" in m for m in err.missing
  )
  assert any("down_1_block_0/nin_shortcut/kernel" in m for m in err.missing)
  assert err.unexpected == ["up_blocks.0.attentions.1.extra_proj.weight"]
  assert len(err.mismatched) == 1 and "mid_block.resnets.0.conv1.weight" in err.mismatched[0]
  for name in ("up_blocks.0.attentions.1.to_k.bias", "extra_proj", "mid_block_1/conv1/kernel"):
    assert name in str(err)


def test_cli_reports_errors_in_one_line(small_folder, tmp_path, capsys):
  src, _ = small_folder
  bad = tmp_path / "bad_cfg"
  _rewrite(src, bad, lambda t: None)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["flip_sin_to_cos"] = True
  (bad / "config.json").write_text(json.dumps(cfg))
  rc = convert.main([f"--src={bad}", f"--workdir={tmp_path / 'wd'}"])
  assert rc == 1
  assert "flip_sin_to_cos" in capsys.readouterr().err
  assert not (tmp_path / "wd").exists()


def test_old_attention_names_convert_the_same(small_folder, tmp_path):
  """Files saved by early diffusers name attention query/key/value/proj_attn."""
  src, _ = small_folder
  _, new, _ = convert.convert(src, None, None, verbose=False)
  renames = {
      ".to_q.": ".query.",
      ".to_k.": ".key.",
      ".to_v.": ".value.",
      ".to_out.0.": ".proj_attn.",
  }

  def edit(t):
    for name in list(t):
      for a, b in renames.items():
        if a in name:
          t[name.replace(a, b)] = t.pop(name)

  old_src = _rewrite(src, tmp_path / "old", edit)
  _, old, _ = convert.convert(old_src, None, None, verbose=False)
  jax.tree.map(np.testing.assert_array_equal, old, new)


def test_pickled_bin_file_converts_the_same(small_folder, tmp_path):
  """A folder with only diffusion_pytorch_model.bin is read with torch when it is installed."""
  src, tmodel = small_folder
  _, want, _ = convert.convert(src, None, None, verbose=False)
  folder = tmp_path / "bin"
  folder.mkdir()
  with open(os.path.join(src, "config.json")) as f:
    (folder / "config.json").write_text(f.read())
  torch.save(tmodel.state_dict(), str(folder / convert.WEIGHTS_BIN_NAME))
  _, got, _ = convert.convert(str(folder), None, None, verbose=False)
  jax.tree.map(np.testing.assert_array_equal, got, want)


# ----------------------------------------------------------------------------
# The written workdir
# ----------------------------------------------------------------------------


def _load_config_py(path: str):
  spec = importlib.util.spec_from_file_location("converted_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow
def test_workdir_restores_and_gives_the_same_outputs(small_folder, tmp_path, capsys):
  src, tmodel = small_folder
  # A pipeline folder (unet/ + scheduler/), as DDPMPipeline.save_pretrained writes it.
  pipe = tmp_path / "ddpm-small-pipeline"
  _rewrite(src, pipe / "unet", lambda t: None)
  diffusers.DDPMScheduler(
      num_train_timesteps=1000,
      beta_schedule="linear",
      variance_type="fixed_large",
      clip_sample=True,
  ).save_pretrained(str(pipe / "scheduler"))
  workdir = tmp_path / "wd"
  assert convert.main([f"--src={pipe}", f"--workdir={workdir}", "--step=7"]) == 0
  printed = capsys.readouterr().out
  assert f"--config={workdir}/config.py --workdir={workdir}" in printed

  config = _load_config_py(str(workdir / "config.py"))
  assert tuple(config.model.ch_mult) == (1, 2) and tuple(config.model.attn_resolutions) == (4,)
  assert config.data.image_size == 8
  model = builders.build_model(config)
  target = jax.eval_shape(
      functools.partial(builders.init_params, model, config), jax.random.PRNGKey(0)
  )
  manager = checkpoints.create_manager(str(workdir), read_only=True)
  params, step = checkpoints.restore_ema_params(manager, target, config)
  assert step == 7

  x = np.random.RandomState(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 900], np.int32)
  ours = np.asarray(jax.jit(lambda x, t: model.apply({"params": params}, x, t))(x, t))
  ref = _torch_forward(tmodel, x, t)
  assert np.max(np.abs(ours - ref)) < 1e-4

  # Converting into a workdir that already has a checkpoint is refused.
  assert convert.main([f"--src={pipe}", f"--workdir={workdir}"]) == 1
  assert "not empty" in capsys.readouterr().err


def test_scheduler_with_another_schedule_is_refused(small_folder, tmp_path):
  src, _ = small_folder
  pipe = tmp_path / "pipe"
  _rewrite(src, pipe / "unet", lambda t: None)
  diffusers.DDPMScheduler(
      num_train_timesteps=1000, beta_schedule="linear", beta_end=0.01
  ).save_pretrained(str(pipe / "scheduler"))
  with pytest.raises(
      convert.UnsupportedConfigError,
      match=r"scheduler_config.json: beta_end=0.01 .*diffusion.beta_end=0.02",
  ):
    convert.convert(str(pipe), None, None, verbose=False)


def test_config_name_must_match_the_weights(small_folder):
  src, _ = small_folder
  with pytest.raises(
      convert.UnsupportedConfigError, match=r"block_out_channels\[0\]=32.*model\.ch=128"
  ):
    convert.convert(src, None, "ddpm_cifar10", verbose=False)


@pytest.mark.parametrize(
    "name", ["ddpm_cifar10", "ddpm_celebahq256", "ddpm_church256", "ddpm_bedroom256", "ddpm_cat256"]
)
def test_released_configs_accept_the_released_architecture(name):
  unet = CIFAR10 if name == "ddpm_cifar10" else LSUN256
  cfg = dict(convert.DIFFUSERS_UNET_DEFAULTS, **unet)
  fields = convert.model_fields_from_diffusers(cfg)
  config, _ = convert.build_config(fields, name)
  assert config.diffusion.model_mean_type == "eps"
  assert config.diffusion.num_timesteps == 1000 and config.diffusion.beta_schedule == "linear"
  assert (config.diffusion.beta_start, config.diffusion.beta_end) == (1e-4, 0.02)
  want_var = "fixedlarge" if name == "ddpm_cifar10" else "fixedsmall"
  assert config.diffusion.model_var_type == want_var
  model = builders.build_model(config)
  target = jax.eval_shape(
      functools.partial(builders.init_params, model, config), jax.random.PRNGKey(0)
  )
  assert count_params(target) == (35_746_307 if name == "ddpm_cifar10" else 113_673_219)


def test_the_config_lookup_works_from_another_working_directory(tmp_path):
  """--config_name=ddpm_cifar10 finds the checkout's configs/ whatever the working directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
      "import sys\n"
      f"sys.path.insert(0, {root!r})\n"
      "from ddpm_jax.convert import diffusers\n"
      f"sys.path.remove({root!r})  # configs/ is no longer importable from sys.path\n"
      "assert 'configs' not in sys.modules\n"
      "config = diffusers._load_config_module('ddpm_cifar10')\n"
      "print(config.model.ch, config.model.ch_mult, config.diffusion.model_var_type)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = run_python(code, env, cwd=tmp_path, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == "128 (1, 2, 2, 2) fixedlarge"
  with pytest.raises(errors.ConfigError, match=r"--config_name=nope: there is no .*nope\.py"):
    convert._load_config_module("nope")


# ----------------------------------------------------------------------------
# Damaged files and 1-channel models
# ----------------------------------------------------------------------------


def test_damaged_weights_and_config_files_are_one_line(small_folder, tmp_path, capsys):
  src, _ = small_folder
  with open(os.path.join(src, convert.WEIGHTS_NAME), "rb") as f:
    weights = f.read()
  cases = {"garbage": b"this is not a safetensors file at all", "truncated": weights[:-1000]}
  for name, data in cases.items():
    folder = tmp_path / name
    _rewrite(src, folder, lambda t: None)
    (folder / convert.WEIGHTS_NAME).write_bytes(data)
    assert convert.main([f"--src={folder}", f"--workdir={tmp_path / (name + '_wd')}"]) == 1
    err = capsys.readouterr().err.strip()
    path = folder / convert.WEIGHTS_NAME
    assert err.startswith(f"error: {path} cannot be read as safetensors (SafetensorError: "), err
    assert err.endswith("); it is damaged or incomplete: download it again"), err
    assert "\n" not in err and "Traceback" not in err
  folder = tmp_path / "bad_json"
  _rewrite(src, folder, lambda t: None)
  (folder / "config.json").write_text('{"block_out_channels": [32, 64],')
  assert convert.main([f"--src={folder}", f"--workdir={tmp_path / 'bad_json_wd'}"]) == 1
  assert capsys.readouterr().err.strip() == (
      f"error: {folder}/config.json cannot be read as JSON (JSONDecodeError: Expecting property "
      "name enclosed in double quotes: line 1 column 33 (char 32))"
  )


def test_a_one_channel_model_converts_without_a_config_name(tmp_path, capsys):
  tmodel = _torch_unet(dict(SMALL, in_channels=1, out_channels=1), seed=7)
  src = _save(tmodel, str(tmp_path / "gray"))
  config, params, notes = convert.convert(src, str(tmp_path / "wd"), None)
  assert config.data.channels == 1 and config.data.dataset == "digits"
  assert any("a 1-channel model: data.dataset='digits' stands in" in n for n in notes)
  assert params["conv_in"]["kernel"].shape[2] == 1
  written = _load_config_py(str(tmp_path / "wd" / "config.py"))
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top

  config_validation.validate(written)  # the written config samples as it is
