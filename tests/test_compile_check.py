"""--mode=compile: the programs compiled for TPU slices with libtpu (compile-only devices, no TPU).

Sizes and costs are checked against counts derived here from the architecture
and the train state's contents, not against the code's own numbers.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu")

from configs import test as test_config
from ddpm_jax import builders, compile_check, errors, tpu


def tiny_config(**model):
  """The test config with a smaller U-Net (one level) and T = 10: fast to compile."""
  config = test_config.get_config()
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.diffusion.num_timesteps = 10
  for k, v in model.items():
    setattr(config.model, k, v)
  return config


@pytest.fixture(scope="module")
def v5e_4():
  return tpu.devices(tpu.parse("v5e-4"))


@pytest.mark.parametrize(
    "name,libtpu_name,devices,hosts",
    [
        ("v3-8", "v3:2x2", 8, 1),  # 4 chips, 2 cores each, each core a device
        ("v4-8", "v4:2x2x1", 4, 1),  # 4 chips, megacore
        ("v4-32", "v4:2x2x4", 16, 4),
        ("v5e-8", "v5e:2x4", 8, 1),  # one host of 8 chips
        ("v5e-16", "v5e:4x4", 16, 4),
        ("v5p-8", "v5p:2x2x1", 4, 1),
        ("v6e-8", "v6e:2x4", 8, 1),
        ("v4:2x2x2", "v4:2x2x2", 8, 2),
    ],
)
def test_slice_names(name, libtpu_name, devices, hosts):
  topology = tpu.parse(name)
  assert topology.libtpu_name == libtpu_name
  devs = tpu.devices(topology)
  assert len(devs) == devices
  assert len({d.process_index for d in devs}) == hosts
  assert all(d.platform == "tpu" for d in devs)


@pytest.mark.parametrize("name", ["v3-7", "v9-8", "tpu", "v4:2x2", ""])
def test_bad_slice_names(name):
  with pytest.raises(errors.ConfigError, match="--topology"):
    tpu.parse(name)


def test_train_step_argument_bytes(v5e_4):
  """Per device: params, EMA and Adam's two moments (4 x P float32), step, key, counts, batch."""
  config = tiny_config(ch=128)  # channel counts of 128: TPU tiles add little padding
  config.training.batch_size = 8
  row = compile_check.report_program(
      config, v5e_4, tpu.parse("v5e-4"), compile_check.build_programs(config, v5e_4)["train"]
  )
  model = builders.build_model(config, platform="tpu")
  p = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(builders.abstract_params(model, config)))
  b = 8 // len(v5e_4)
  expected = (
      4 * 4 * p  # params, ema_params, Adam mu and nu
      + 4  # step, int32
      + 2 * 4  # the run's PRNG key, uint32[2]
      + 2 * 4  # Adam's and the learning-rate schedule's step counts, int32
      + b * 8 * 8 * 1 * 4  # the batch: b digits of 8x8x1 float32
  )
  assert row["argument_bytes_logical"] == expected
  # TPU layouts pad arrays to (8, 128) tiles: a little more on the device, never less.
  assert expected <= row["argument_bytes"] <= 1.05 * expected
  assert row["fits"] and row["total_bytes"] <= tpu.CHIPS["v5e"].hbm_bytes


def unet_forward_macs(ch, ch_mult, num_res_blocks, attn_resolutions, size, channels, lanes=1):
  """Multiply-accumulates of one image through the paper's U-Net: convs, dense layers, attention.

  Follows the paper's layout (Ho et al. 2020, Appendix B; diffusion_tf/models/unet.py):
  ResNet blocks (two 3x3 convs, a time-embedding projection, a 1x1 shortcut when
  the channels change), attention (q, k, v, out projections and the two matrix
  products), strided-conv downsampling and conv upsampling. ``lanes``: the image's
  channels count as a multiple of this in the first and last conv (the TPU's
  matrix unit works on 128 channels at a time).
  """
  image_channels = -(-channels // lanes) * lanes
  temb = 4 * ch
  macs = ch * temb + temb * temb  # the two time-embedding dense layers

  def conv(s, cin, cout, k=3):
    return s * s * k * k * cin * cout

  def resblock(s, cin, cout):
    m = conv(s, cin, cout) + temb * cout + conv(s, cout, cout)
    return m + (s * s * cin * cout if cin != cout else 0)

  def attn(s, c):
    return 4 * s * s * c * c + 2 * (s * s) ** 2 * c

  macs += conv(size, image_channels, ch)
  skips, c, s = [ch], ch, size
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      macs += resblock(s, c, ch * mult)
      c = ch * mult
      macs += attn(s, c) if s in attn_resolutions else 0
      skips.append(c)
    if level != len(ch_mult) - 1:
      macs += conv(s // 2, c, c)  # stride 2: outputs at half the size
      s //= 2
      skips.append(c)
  macs += 2 * resblock(s, c, c) + attn(s, c)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      macs += resblock(s, c + skips.pop(), ch * ch_mult[level])
      c = ch * ch_mult[level]
      macs += attn(s, c) if s in attn_resolutions else 0
    if level != 0:
      s *= 2
      macs += conv(s, c, c)
  assert not skips
  return macs + conv(size, ch, image_channels)


def test_forward_flops_per_image(v5e_4):
  """The network's FLOPs per image on the TPU within 10% of 2 x its multiply-accumulates.

  The rest is the elementwise work XLA counts too (GroupNorm, swish, adds: about 8% here).
  """
  config = test_config.get_config()  # two levels
  # 128 channels, as the paper's: XLA also counts the elementwise work (GroupNorm,
  # swish), about 18% of the convs' FLOPs at 32 channels and a quarter of that here.
  config.model.ch = 128
  config.data.image_size = 16
  config.model.attn_resolutions = (8,)
  b = 4
  model = builders.build_model(config, platform="tpu")
  compiled = compile_check._forward_program(model, config, v5e_4, b, False).compile()
  flops, seconds = compile_check._cost(compiled)
  m = config.model
  expected = 2 * unet_forward_macs(m.ch, m.ch_mult, m.num_res_blocks, (8,), 16, 1, lanes=128)
  assert abs(flops / b - expected) <= 0.10 * expected, (flops / b, expected)
  assert seconds is None or seconds > 0


def test_tpu_program_has_no_cpu_kernels(v5e_4):
  """The default (CPU kernels on, for CPU programs) changes nothing in a TPU program: its HLO is
  the plain model's, though the same config on a CPU builds the kernels."""
  config = test_config.get_config()
  config.model.attn_resolutions = ()
  config.data.image_size = 16  # level sizes 16 and 8: Winograd's shapes on a CPU
  plain = config.copy_and_resolve_references()
  plain.model.cpu_kernels = False
  assert config.model.cpu_kernels  # the default
  assert builders.build_model(config, platform="cpu").cpu_kernels
  assert not builders.build_model(config, platform="tpu").cpu_kernels
  texts = []
  for c in (config, plain):
    program = compile_check.build_programs(c, v5e_4)["train"]
    texts.append(program.lower(2).as_text())
  assert texts[0] == texts[1]


def test_two_host_slice_compiles(tmp_path):
  """v4:2x2x2: two hosts of four chips; the train step for the global batch, and the JSON."""
  config = tiny_config()
  config.training.batch_size = 16
  report = compile_check.run_compile(config, str(tmp_path), "v4:2x2x2", programs=("train",))
  assert (report["devices"], report["hosts"]) == (8, 2)
  (row,) = report["programs"]
  assert row["per_device_batch"] == 2 and row["images_per_call"] == 16 and row["fits"]
  with open(tmp_path / "compile_v4_2x2x2.json") as f:
    assert json.load(f)["programs"][0]["argument_bytes"] == row["argument_bytes"]


@pytest.mark.parametrize(
    "curve, compiles_if_exact",
    [
        # bytes(b): affine; affine with a step (a tile boundary); bending near the limit, where the
        # TPU compiler rematerialises to fit; convex, where every secant overshoots (a bracket).
        (lambda b: 10_000 + 700 * b, 3),
        (lambda b: 10_000 + 700 * b + (50_000 if b > 900 else 0), 3),
        (lambda b: 10_000 + 700 * min(b, 1000) + 20 * max(b - 1000, 0), 3),
        (lambda b: 10_000 + 5 * b * b, None),
    ],
)
def test_the_largest_batch_search_against_curves_known_in_closed_form(
    monkeypatch, curve, compiles_if_exact
):
  """The search finds the largest batch under the limit of a memory curve given as a formula, or
  a bracket whose ends are right, within its compile budget."""
  hbm = 800_000
  want = max(b for b in range(1, 2**17) if curve(b) <= hbm)  # by scanning every batch
  calls = []

  def fake_fits(program, b, limit):
    calls.append(b)
    return curve(b) <= limit, curve(b)

  monkeypatch.setattr(compile_check, "_fits", fake_fits)
  found = compile_check.largest_batch(None, hbm, 2**17, curve(2**17))
  assert found["compiles"] == len(calls) <= compile_check.MAX_SEARCH_COMPILES
  assert curve(found["largest_fitting"]) <= hbm < curve(found["smallest_failing"])
  assert found["largest_fitting"] <= want < found["smallest_failing"]
  if found["largest_fitting"]:
    assert found["largest_fitting_bytes"] == curve(found["largest_fitting"])
  assert found["exact"] == (found["largest_fitting"] == want)
  if compiles_if_exact:
    assert found["exact"] and found["compiles"] == compiles_if_exact


@pytest.mark.slow
def test_a_config_that_cannot_fit(monkeypatch):
  """A batch too large for the chip: reported, with the largest batch that fits (or a bracket
  whose ends were compiled) and the settings that fit, each found by compiling.

  The chip is a v5e whose HBM is set between what 2 and 8 images per device take: the TPU
  compiler takes minutes per program at the hundreds of images that fill 16 GiB (and here
  ~9 s at 4 images, ~24 s at 16, ~37 s at 32), and the search and the fixes use the limit the
  same way whatever it is."""
  monkeypatch.setattr(compile_check, "MAX_SEARCH_COMPILES", 3)
  devs = tpu.devices(tpu.parse("v5e-1"))
  config = tiny_config()
  config.training.batch_size = 8
  program = compile_check.build_programs(config, devs)["train"]
  low, high = (compile_check._fits(program, b, 2**62)[1] for b in (2, 8))
  assert low < high
  hbm = (low + high) // 2
  monkeypatch.setitem(tpu.CHIPS, "v5e", dataclasses.replace(tpu.CHIPS["v5e"], hbm_bytes=hbm))
  topology = tpu.parse("v5e-1")
  row = compile_check.report_program(config, devs, topology, program)
  assert row["hbm_bytes"] == hbm and row["total_bytes"] == high and not row["fits"]
  largest, failing = (
      row["largest_fitting_per_device_batch"],
      row["smallest_failing_per_device_batch"],
  )
  assert 2 <= largest < failing <= 8 and row["search_compiles"] <= 3
  assert row["largest_fitting_total_bytes"] <= hbm
  assert set(row["fixes"]) >= {"model.dtype=bfloat16", "model.remat=True"}
  assert any(k.startswith("training.grad_accum_steps") and ok for k, ok in row["fixes"].items())
  line = compile_check._fmt_row(row)
  assert "DOES NOT FIT (largest per-device batch that fits: " in line and "\n" not in line


def test_without_libtpu_one_line(monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_libtpu(name, *args, **kwargs):
    if name == "libtpu":
      raise ImportError("No module named 'libtpu'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_libtpu)
  with pytest.raises(errors.UserError, match="requirements-tpu.txt"):
    tpu.devices(tpu.parse("v3-8"))
