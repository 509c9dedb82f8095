"""Import released DDPM weights in diffusers format into this repo's Flax U-Net.

The weights Ho et al. released (CIFAR-10, CelebA-HQ, LSUN church/bedroom/cat)
are on the Hugging Face hub as diffusers ``UNet2DModel`` folders
(``google/ddpm-cifar10-32``, ``google/ddpm-ema-church-256``, ...; see
``docs/pretrained.md``). A folder holds ``config.json`` and
``diffusion_pytorch_model.safetensors``; a pipeline folder holds the same under
``unet/`` and the sampler's settings in ``scheduler/scheduler_config.json``.

    python -m ddpm_jax.convert --src=ddpm-ema-church-256 --workdir=workdir/church \
        [--config_name=ddpm_church256] [--step=0]

writes an orbax checkpoint (``params`` = ``ema_params`` = the converted weights,
a fresh Adam state, the given step) and ``WORKDIR/config.py``, the matching
config, so that ``python main.py --mode=sample --config=WORKDIR/config.py
--workdir=WORKDIR`` samples from the released model.

The weights are read with ``safetensors.numpy`` (no PyTorch needed); only a
folder with nothing but a pickled ``diffusion_pytorch_model.bin`` needs torch.

Correspondence (diffusers ``up_blocks[k]`` is our level ``L-1-k``)::

    conv_in                                  conv_in
    time_embedding.linear_1 / linear_2       temb_dense0 / temb_dense1
    down_blocks.i.resnets.j                  down_{i}_block_{j}
    down_blocks.i.attentions.j               down_{i}_attn_{j}
    down_blocks.i.downsamplers.0.conv        down_{i}_downsample/conv
    mid_block.resnets.0 / attentions.0 / resnets.1   mid_block_1 / mid_attn_1 / mid_block_2
    up_blocks.k.resnets.j                    up_{L-1-k}_block_{j}
    up_blocks.k.attentions.j                 up_{L-1-k}_attn_{j}
    up_blocks.k.upsamplers.0.conv            up_{L-1-k}_upsample/conv
    conv_norm_out / conv_out                 norm_out / conv_out
  inside a ResNet block:
    norm1, conv1, norm2, conv2               same names
    time_emb_proj                            temb_proj
    conv_shortcut (1x1 conv)                 nin_shortcut (Dense)
  inside an attention block:
    group_norm                               norm
    to_q / to_k / to_v / to_out.0            q / k / v / proj_out
    (older files: query / key / value / proj_attn)
  leaves:
    Conv2d weight [O, I, kh, kw]             kernel [kh, kw, I, O]
    Linear weight [out, in]                  kernel [in, out]
    1x1 Conv2d weight [O, I, 1, 1]           Dense kernel [I, O]
    GroupNorm weight / bias                  scale / bias
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pprint
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import builders, checkpoints, config_loading, config_schema, config_validation
from ddpm_jax import errors, files
from ddpm_jax.models.unet import count_params

__all__ = [
    "UnsupportedConfigError",
    "WeightMappingError",
    "DIFFUSERS_UNET_DEFAULTS",
    "find_model_dir",
    "load_unet_config",
    "load_tensors",
    "find_scheduler_config",
    "model_fields_from_diffusers",
    "build_config",
    "convert_tensors",
    "convert",
    "write_workdir",
    "main",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_BIN_NAME = "diffusion_pytorch_model.bin"

# The experiment configs of the checkout this package is in (repository/ddpm_jax/convert/).
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)

# Known released models: a word in the folder name -> the config in configs/.
KNOWN_CONFIGS = (
    ("cifar10", "ddpm_cifar10"),
    ("celebahq", "ddpm_celebahq256"),
    ("celeba-hq", "ddpm_celebahq256"),
    ("celeba_hq", "ddpm_celebahq256"),
    ("church", "ddpm_church256"),
    ("bedroom", "ddpm_bedroom256"),
    ("cat", "ddpm_cat256"),
)

# UNet2DModel.__init__ defaults (diffusers 0.42): a key missing from config.json
# takes this value in diffusers, so it is checked as if it were written.
DIFFUSERS_UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
GN_GROUPS = 32
GN_EPS = 1e-6


class UnsupportedConfigError(errors.WeightsError):
  """A diffusers config value our U-Net cannot express; ``key`` names the config.json key."""

  def __init__(self, key: str, value: Any, need: str, file: str = "config.json"):
    self.key = key
    super().__init__(f"{file}: {key}={value!r} is not supported: {need}")


class WeightMappingError(errors.WeightsError):
  """The tensors of the file do not fill our parameter tree one-to-one.

  Attributes: ``missing`` (our params with no tensor, as 'path (diffusers name)'),
  ``unexpected`` (diffusers tensors no param takes), ``mismatched`` (shape errors).
  """

  def __init__(self, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]):
    self.missing, self.unexpected, self.mismatched = (
        list(missing),
        list(unexpected),
        list(mismatched),
    )
    parts = []
    if self.missing:
      parts.append(
          f"{len(self.missing)} parameter(s) of our U-Net have no tensor in the file: "
          + ", ".join(self.missing)
      )
    if self.unexpected:
      parts.append(
          f"{len(self.unexpected)} tensor(s) of the file map to no parameter: "
          + ", ".join(self.unexpected)
      )
    if self.mismatched:
      parts.append(f"{len(self.mismatched)} shape mismatch(es): " + ", ".join(self.mismatched))
    super().__init__("; ".join(parts))


# ----------------------------------------------------------------------------
# Reading a diffusers folder
# ----------------------------------------------------------------------------


def _read_json(path: str) -> dict:
  """The JSON object in ``path``; a file that is not one is a WeightsError naming it."""
  try:
    with open(path) as f:
      out = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise errors.WeightsError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
  if not isinstance(out, dict):
    raise errors.WeightsError(f"{path} holds a JSON {type(out).__name__}, not an object")
  return out


def _unreadable(path: str, what: str, e: Exception) -> errors.WeightsError:
  first = (str(e).splitlines() or [""])[0]
  return errors.WeightsError(
      f"{path} cannot be read as {what} ({type(e).__name__}: {first}); it is damaged or "
      "incomplete: download it again"
  )


def find_model_dir(src: str) -> str:
  """The folder holding the UNet's config.json: ``src`` itself or ``src/unet``."""
  if not os.path.isdir(src):
    raise errors.WeightsNotFoundError(f"--src={src} is not a directory")
  for cand in (src, os.path.join(src, "unet")):
    path = os.path.join(cand, "config.json")
    if os.path.isfile(path):
      cfg = _read_json(path)
      if cfg.get("_class_name", "UNet2DModel") == "UNet2DModel" and "block_out_channels" in cfg:
        return cand
  raise errors.WeightsNotFoundError(
      f"{src} holds no UNet2DModel config.json (looked in {src}/config.json and "
      f"{src}/unet/config.json); point --src at a diffusers model or pipeline folder"
  )


def load_unet_config(model_dir: str) -> dict:
  """config.json with diffusers' defaults filled in for the keys it lacks.

  Keys diffusers does not know are dropped with a warning, as diffusers itself
  ignores them.
  """
  raw = _read_json(os.path.join(model_dir, "config.json"))
  cls = raw.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise UnsupportedConfigError("_class_name", cls, "only UNet2DModel can be converted")
  cfg = dict(DIFFUSERS_UNET_DEFAULTS)
  unknown = []
  for k, v in raw.items():
    if k.startswith("_"):
      continue
    if k in cfg:
      cfg[k] = v
    else:
      unknown.append(k)
  if unknown:
    print(
        f"warning: config.json keys unknown to UNet2DModel, ignored as diffusers does: "
        f"{sorted(unknown)}",
        file=sys.stderr,
    )
  return cfg


def load_tensors(model_dir: str) -> dict[str, np.ndarray]:
  """All tensors of the model folder as float32 numpy arrays, by diffusers name."""
  path = os.path.join(model_dir, WEIGHTS_NAME)
  index = os.path.join(model_dir, WEIGHTS_INDEX_NAME)
  if os.path.isfile(path) or os.path.isfile(index):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    if os.path.isfile(path):
      files = [path]
    else:  # sharded
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise errors.WeightsError(f"{index} has no 'weight_map' object")
      files = sorted({os.path.join(model_dir, f) for f in weight_map.values()})
    tensors = {}
    for f in files:
      try:
        tensors.update(load_file(f))
      except Exception as e:  # pylint: disable=broad-except
        # safetensors raises SafetensorError (a bad header or size) or OSError.
        raise _unreadable(f, "safetensors", e) from None
  elif os.path.isfile(os.path.join(model_dir, WEIGHTS_BIN_NAME)):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise errors.WeightsNotFoundError(
          f"{model_dir} has only {WEIGHTS_BIN_NAME} (a torch pickle) and torch is not installed; "
          f"download {WEIGHTS_NAME} instead, or install torch"
      ) from None
    try:
      state = torch.load(
          os.path.join(model_dir, WEIGHTS_BIN_NAME), map_location="cpu", weights_only=True
      )
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(os.path.join(model_dir, WEIGHTS_BIN_NAME), "a torch file", e) from None
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise errors.WeightsNotFoundError(
        f"{model_dir} holds no {WEIGHTS_NAME} (nor {WEIGHTS_BIN_NAME})"
    )
  out = {}
  for k, v in tensors.items():
    v = np.asarray(v)
    if not np.issubdtype(v.dtype, np.floating):
      raise errors.WeightsError(f"tensor {k} has dtype {v.dtype}, expected floating point")
    out[k] = v.astype(np.float32)
  return out


def find_scheduler_config(src: str, model_dir: str) -> Optional[dict]:
  """The DDPMScheduler settings shipped next to the model, if any."""
  for path in (
      os.path.join(src, "scheduler_config.json"),
      os.path.join(src, "scheduler", "scheduler_config.json"),
      os.path.join(model_dir, "scheduler_config.json"),
      os.path.join(
          os.path.dirname(os.path.abspath(model_dir)), "scheduler", "scheduler_config.json"
      ),
  ):
    if os.path.isfile(path):
      return _read_json(path)
  return None


# ----------------------------------------------------------------------------
# The config: what our U-Net can express
# ----------------------------------------------------------------------------


def _require(cfg: dict, key: str, ok: bool, need: str) -> None:
  if not ok:
    raise UnsupportedConfigError(key, cfg.get(key), need)


def model_fields_from_diffusers(cfg: dict) -> dict:
  """Our model/data fields for a diffusers UNet2DModel config (defaults filled in).

  Returns dict(ch, ch_mult, num_res_blocks, attn_resolutions, image_size,
  channels, out_channels). Raises UnsupportedConfigError naming the first key
  whose value our U-Net (the paper's architecture) cannot express.
  """
  _require(
      cfg,
      "center_input_sample",
      cfg["center_input_sample"] is False,
      "must be false (our model takes inputs in [-1, 1] as they are)",
  )
  _require(
      cfg,
      "time_embedding_type",
      cfg["time_embedding_type"] == "positional",
      "must be 'positional' (the paper's sinusoidal embedding)",
  )
  _require(
      cfg,
      "flip_sin_to_cos",
      cfg["flip_sin_to_cos"] is False,
      "must be false (the paper's embedding is [sin, cos])",
  )
  _require(
      cfg,
      "freq_shift",
      cfg["freq_shift"] == 1,
      "must be 1 (the paper's frequencies exp(-ln(10000) k / (D/2 - 1)))",
  )
  _require(cfg, "act_fn", cfg["act_fn"] in ("silu", "swish"), "must be 'silu' (swish)")
  _require(
      cfg,
      "norm_num_groups",
      cfg["norm_num_groups"] == GN_GROUPS,
      f"must be {GN_GROUPS} (our GroupNorms have 32 groups)",
  )
  _require(
      cfg,
      "attn_norm_num_groups",
      cfg["attn_norm_num_groups"] in (None, GN_GROUPS),
      f"must be null or {GN_GROUPS}",
  )
  eps = cfg["norm_eps"]
  _require(
      cfg,
      "norm_eps",
      isinstance(eps, (int, float)) and math.isclose(eps, GN_EPS, rel_tol=1e-6),
      f"must be {GN_EPS} (our GroupNorm epsilon)",
  )
  _require(
      cfg,
      "resnet_time_scale_shift",
      cfg["resnet_time_scale_shift"] == "default",
      "must be 'default' (the timestep embedding is added, not a scale-shift)",
  )
  _require(
      cfg,
      "mid_block_type",
      cfg["mid_block_type"] == "UNetMidBlock2D",
      "must be 'UNetMidBlock2D' (ResNet, attention, ResNet)",
  )
  _require(
      cfg,
      "add_attention",
      cfg["add_attention"] is True,
      "must be true (the middle block has attention)",
  )
  _require(cfg, "mid_block_scale_factor", cfg["mid_block_scale_factor"] == 1, "must be 1")
  _require(cfg, "downsample_type", cfg["downsample_type"] == "conv", "must be 'conv'")
  _require(cfg, "upsample_type", cfg["upsample_type"] == "conv", "must be 'conv'")
  _require(
      cfg,
      "downsample_padding",
      cfg["downsample_padding"] == 0,
      "must be 0 (pad bottom/right by one, i.e. TF 'SAME', as in the paper)",
  )
  _require(cfg, "class_embed_type", cfg["class_embed_type"] is None, "must be null (unconditional)")
  _require(cfg, "num_class_embeds", cfg["num_class_embeds"] is None, "must be null (unconditional)")

  boc = cfg["block_out_channels"]
  _require(
      cfg,
      "block_out_channels",
      isinstance(boc, (list, tuple))
      and len(boc) >= 1
      and all(isinstance(c, int) and c > 0 for c in boc),
      "must be a non-empty list of positive ints",
  )
  ch = int(boc[0])
  _require(
      cfg,
      "block_out_channels",
      ch % GN_GROUPS == 0 and all(c % ch == 0 for c in boc),
      f"each must be a multiple of the first, which must be a multiple of {GN_GROUPS}",
  )
  ch_mult = tuple(int(c) // ch for c in boc)
  L = len(boc)
  temb_dim = cfg["time_embedding_dim"]
  _require(
      cfg,
      "time_embedding_dim",
      temb_dim in (None, 4 * ch),
      f"must be null or 4 * block_out_channels[0] = {4 * ch}",
  )

  R = cfg["layers_per_block"]
  _require(cfg, "layers_per_block", isinstance(R, int) and R >= 1, "must be a positive int")

  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  _require(
      cfg,
      "down_block_types",
      len(down) == L and all(t in _DOWN_TYPES for t in down),
      f"must list {L} (len(block_out_channels)) of {sorted(_DOWN_TYPES)}",
  )
  _require(
      cfg,
      "up_block_types",
      len(up) == L and all(t in _UP_TYPES for t in up),
      f"must list {L} (len(block_out_channels)) of {sorted(_UP_TYPES)}",
  )
  down_attn = [_DOWN_TYPES[t] for t in down]
  up_attn = [_UP_TYPES[t] for t in reversed(up)]  # up_block_types[k] is level L-1-k
  _require(
      cfg,
      "up_block_types",
      down_attn == up_attn,
      f"attention must be at the same levels as in down_block_types {down} "
      "(our attn_resolutions applies to both paths)",
  )

  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    _require(
        cfg,
        "sample_size",
        len(size) == 2 and size[0] == size[1],
        "must be square (our data.image_size is one number)",
    )
    size = size[0]
  _require(
      cfg,
      "sample_size",
      isinstance(size, int) and size > 0 and size % 2 ** (L - 1) == 0,
      f"must be a positive int divisible by 2**(len(block_out_channels)-1) = {2 ** (L - 1)}",
  )
  attn_resolutions = tuple(size // 2**i for i in range(L) if down_attn[i])

  # Single-head attention everywhere: heads = channels // attention_head_dim == 1.
  head_dim = cfg["attention_head_dim"]
  attn_channels = sorted({int(boc[i]) for i in range(L) if down_attn[i]} | {int(boc[-1])})
  _require(
      cfg,
      "attention_head_dim",
      head_dim is None or all(head_dim == c for c in attn_channels),
      f"must be null (one attention head; the attention layers have {attn_channels} channels)",
  )

  cin, cout = cfg["in_channels"], cfg["out_channels"]
  _require(cfg, "in_channels", cin in (1, 3), "must be 1 or 3")
  _require(
      cfg,
      "out_channels",
      cout in (cin, 2 * cin),
      f"must be in_channels={cin} (eps) or {2 * cin} (eps and learned variance)",
  )
  return dict(
      ch=ch,
      ch_mult=ch_mult,
      num_res_blocks=int(R),
      attn_resolutions=attn_resolutions,
      image_size=int(size),
      channels=int(cin),
      out_channels=int(cout),
  )


def _load_config_module(name: str) -> ml_collections.ConfigDict:
  """``name``: a config of the repository's configs/ ('ddpm_cifar10') or the path of a .py file.

  configs/ is that of the checkout holding this package (``CONFIGS_DIR``), found
  from any working directory; an installed package has none, so it takes paths.
  """
  if name.endswith(".py") or os.sep in name:
    if not os.path.isfile(name):
      raise errors.WeightsNotFoundError(f"--config_name={name}: no such config file")
    path = name
  else:
    path = os.path.join(CONFIGS_DIR, f"{name}.py")
    if not os.path.isfile(path):
      raise errors.ConfigError(
          f"--config_name={name}: there is no {path}; give the path of a config .py file"
      )
  return config_loading.load_file(path, flag=f"--config_name={name}")


def guess_config_name(src: str, fields: dict) -> Optional[str]:
  """The configs/ddpm_*.py of the released model in ``src``, or None.

  Picked by a word of the folder name ('cifar10', 'church', ...); used only when
  its architecture is that of the weights.
  """
  base = os.path.basename(os.path.normpath(os.path.abspath(src))).lower()
  for word, name in KNOWN_CONFIGS:
    if word in base and _first_mismatch(_load_config_module(name), fields) is None:
      return name
  return None


_SCHED_VAR = {
    "fixed_small": "fixedsmall",
    "fixed_large": "fixedlarge",
    "learned": "learned",
    "learned_range": "learned_range",
}
_SCHED_MEAN = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _check_scheduler(sched: dict, config) -> list[str]:
  """Refuses a schedule that differs from the config's; returns notes on sampler settings."""
  d = config.diffusion
  checks = (
      ("num_train_timesteps", 1000, "diffusion.num_timesteps", d.num_timesteps),
      ("beta_schedule", "linear", "diffusion.beta_schedule", d.beta_schedule),
      ("beta_start", 0.0001, "diffusion.beta_start", d.beta_start),
      ("beta_end", 0.02, "diffusion.beta_end", d.beta_end),
  )
  for key, default, field, ours in checks:
    theirs = sched.get(key, default)
    same = math.isclose(theirs, ours, rel_tol=1e-9) if isinstance(ours, float) else theirs == ours
    if not same:
      raise UnsupportedConfigError(
          key,
          theirs,
          f"the config has {field}={ours!r}; the network was trained for the scheduler's value",
          file="scheduler_config.json",
      )
  if sched.get("trained_betas") is not None:
    raise UnsupportedConfigError(
        "trained_betas",
        "[...]",
        "must be null (only the named schedules are supported)",
        file="scheduler_config.json",
    )
  pred = sched.get("prediction_type", "epsilon")
  if _SCHED_MEAN.get(pred) != d.model_mean_type:
    raise UnsupportedConfigError(
        "prediction_type",
        pred,
        f"the config has diffusion.model_mean_type={d.model_mean_type!r}",
        file="scheduler_config.json",
    )
  notes = []
  var = sched.get("variance_type", "fixed_small")
  if _SCHED_VAR.get(var) != d.model_var_type:
    notes.append(
        f"note: scheduler_config.json has variance_type={var!r}; the config samples with "
        f"diffusion.model_var_type={d.model_var_type!r} (override with "
        f"--config.diffusion.model_var_type=...)"
    )
  if bool(sched.get("clip_sample", True)) != bool(config.sampling.clip_denoised):
    notes.append(
        f"note: scheduler_config.json has clip_sample={sched.get('clip_sample')!r}; the "
        f"config has sampling.clip_denoised={config.sampling.clip_denoised!r}"
    )
  return notes


def _first_mismatch(config, fields: dict):
  """(config field, its value, the weights' value, config.json key) of the first
  model/data field of ``config`` that the weights contradict, or None."""
  m = config.model
  want = (
      ("model.ch", m.ch, fields["ch"], "block_out_channels[0]"),
      ("model.ch_mult", tuple(m.ch_mult), fields["ch_mult"], "block_out_channels"),
      ("model.num_res_blocks", m.num_res_blocks, fields["num_res_blocks"], "layers_per_block"),
      (
          "model.attn_resolutions",
          tuple(m.attn_resolutions),
          fields["attn_resolutions"],
          "down_block_types/up_block_types and sample_size",
      ),
      ("model.resamp_with_conv", m.resamp_with_conv, True, "downsample_type/upsample_type"),
      ("model.num_classes", m.num_classes, 0, "num_class_embeds"),
      ("data.image_size", config.data.image_size, fields["image_size"], "sample_size"),
      ("data.channels", config.data.channels, fields["channels"], "in_channels"),
  )
  for field, ours, theirs, key in want:
    if ours != theirs:
      return field, ours, theirs, key
  return None


def build_config(
    fields: dict, config_name: Optional[str] = None, scheduler: Optional[dict] = None
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The experiment config for converted weights, and notes to print.

  With ``config_name`` its model/data fields must agree with ``fields`` (an
  error names the first that does not); without, configs/default.py is used
  with ``fields`` written in (and training fields left at the CIFAR-10 defaults).
  """
  notes = []
  if config_name:
    config = _load_config_module(config_name)
    bad = _first_mismatch(config, fields)
    if bad:
      field, ours, theirs, key = bad
      raise UnsupportedConfigError(
          key,
          theirs,
          f"--config_name={config_name} has {field}={ours!r}, the weights need "
          f"{theirs!r}; pick the config of this model or leave --config_name out",
      )
  else:
    config = config_schema.get_config()
    config.model.ch = fields["ch"]
    config.model.ch_mult = fields["ch_mult"]
    config.model.num_res_blocks = fields["num_res_blocks"]
    config.model.attn_resolutions = fields["attn_resolutions"]
    config.model.resamp_with_conv = True
    config.model.num_classes = 0
    config.data.image_size = fields["image_size"]
    config.data.channels = fields["channels"]
    notes.append("note: no --config_name: configs/default.py with the model fields of config.json")
    if fields["channels"] == 1:
      # The only built-in grayscale data set; sampling reads no data.
      config.data.dataset = "digits"
      notes.append(
          "note: a 1-channel model: data.dataset='digits' stands in for its data; to evaluate "
          "it on your images, set data.dataset='folder' and data.folder in the written config.py"
      )
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  if fields["out_channels"] != fields["channels"] * (2 if learned else 1):
    raise UnsupportedConfigError(
        "out_channels",
        fields["out_channels"],
        f"the config's diffusion.model_var_type={config.diffusion.model_var_type!r} needs "
        f"{fields['channels'] * (2 if learned else 1)} output channels",
    )
  if scheduler is not None:
    notes += _check_scheduler(scheduler, config)
  return config, notes


# ----------------------------------------------------------------------------
# The tensors
# ----------------------------------------------------------------------------

_RESNET_LAYERS = {
    "norm1": ("norm1",),
    "conv1": ("conv1",),
    "temb_proj": ("time_emb_proj",),
    "norm2": ("norm2",),
    "conv2": ("conv2",),
    "nin_shortcut": ("conv_shortcut",),
}
_ATTN_LAYERS = {
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}


def _module_prefixes(num_levels: int, num_res_blocks: int) -> dict[str, str]:
  """Our top-level module name -> diffusers module prefix."""
  L, R = num_levels, num_res_blocks
  out = {
      "conv_in": "conv_in",
      "temb_dense0": "time_embedding.linear_1",
      "temb_dense1": "time_embedding.linear_2",
      "norm_out": "conv_norm_out",
      "conv_out": "conv_out",
      "mid_block_1": "mid_block.resnets.0",
      "mid_attn_1": "mid_block.attentions.0",
      "mid_block_2": "mid_block.resnets.1",
  }
  for i in range(L):
    for j in range(R):
      out[f"down_{i}_block_{j}"] = f"down_blocks.{i}.resnets.{j}"
      out[f"down_{i}_attn_{j}"] = f"down_blocks.{i}.attentions.{j}"
    out[f"down_{i}_downsample"] = f"down_blocks.{i}.downsamplers.0"
    k = L - 1 - i
    for j in range(R + 1):
      out[f"up_{i}_block_{j}"] = f"up_blocks.{k}.resnets.{j}"
      out[f"up_{i}_attn_{j}"] = f"up_blocks.{k}.attentions.{j}"
    out[f"up_{i}_upsample"] = f"up_blocks.{k}.upsamplers.0"
  return out


def _candidates(path: tuple[str, ...], prefixes: dict[str, str]) -> list[str]:
  """The diffusers names (new first, then older) that hold our leaf ``path``."""
  top, *inner, leaf = path
  if top not in prefixes:
    return []
  prefix = prefixes[top]
  if not inner:
    layer_names = [""]
  elif "_attn_" in top or top == "mid_attn_1":
    layer_names = ["." + n for n in _ATTN_LAYERS.get(inner[0], ())]
  elif "_block_" in top:
    layer_names = ["." + n for n in _RESNET_LAYERS.get(inner[0], ())]
  elif inner == ["conv"]:  # down/upsample
    layer_names = [".conv"]
  else:
    layer_names = []
  if len(inner) > 1:
    return []
  suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
  if suffix is None:
    return []
  return [f"{prefix}{n}.{suffix}" for n in layer_names]


def _to_ours(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """One diffusers tensor in our layout (conv OIHW -> HWIO, linear/1x1 conv -> [in, out])."""
  if len(target_shape) == 4:  # conv kernel
    if value.ndim != 4:
      return value
    return np.transpose(value, (2, 3, 1, 0))
  if (
      len(target_shape) == 2
  ):  # Dense kernel from nn.Linear [out, in] or a 1x1 Conv2d [out, in, 1, 1]
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    elif value.ndim == 3 and value.shape[2] == 1:  # Conv1d (very old attention files)
      value = value[:, :, 0]
    if value.ndim != 2:
      return value
    return value.T
  return value


def convert_tensors(
    tensors: dict[str, np.ndarray], target: Any, num_levels: int, num_res_blocks: int
) -> dict:
  """Our parameter tree (float32 numpy) from diffusers tensors.

  Args:
    tensors: diffusers name -> array (as in the safetensors file).
    target: our parameter tree of shapes (``jax.eval_shape`` of the init).
    num_levels, num_res_blocks: len(ch_mult) and model.num_res_blocks.
  Raises:
    WeightMappingError listing every unfilled parameter, every unused tensor
    and every shape mismatch.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  prefixes = _module_prefixes(num_levels, num_res_blocks)
  flat_target = traverse_util.flatten_dict(target)
  used, out = set(), {}
  missing, mismatched = [], []
  for path, leaf in sorted(flat_target.items()):
    names = _candidates(path, prefixes)
    found = [n for n in names if n in tensors]
    ours = "/".join(path)
    if not found:
      missing.append(f"{ours} ({' or '.join(names) if names else 'no diffusers counterpart'})")
      continue
    if len(found) > 1:
      mismatched.append(f"{ours}: the file has both {found[0]} and {found[1]}")
      continue
    name = found[0]
    used.add(name)
    value = _to_ours(name, tensors[name], tuple(leaf.shape))
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name} {tuple(tensors[name].shape)} -> {ours} needs {tuple(leaf.shape)}")
      continue
    out[path] = np.ascontiguousarray(value, dtype=np.float32)
  unexpected = sorted(set(tensors) - used)
  if missing or unexpected or mismatched:
    raise WeightMappingError(missing, unexpected, mismatched)
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------
# Writing a workdir
# ----------------------------------------------------------------------------

_CONFIG_PY = '''"""Config of the weights converted by ddpm_jax.convert (written by it; edit freely).

Source: {src}
Base config: {base}

  python main.py --mode=sample --config={config_path} --workdir={workdir}
"""

import ml_collections

_CONFIG = {body}


def get_config():
  return ml_collections.ConfigDict(_CONFIG)
'''


def _as_python(value):
  """ConfigDict.to_dict() with lists as tuples (as the configs write them)."""
  if isinstance(value, dict):
    return {k: _as_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_as_python(v) for v in value)
  return value


def write_workdir(
    workdir: str,
    params: Any,
    config: ml_collections.ConfigDict,
    step: int = 0,
    src: str = "",
    base: str = "",
) -> str:
  """Writes the checkpoint (params = ema_params) and ``workdir/config.py``; returns its path."""
  workdir = os.path.abspath(workdir)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise errors.WorkdirError(f"{ckpt_dir} is not empty; convert into a new --workdir")
  os.makedirs(workdir, exist_ok=True)
  params = jax.tree.map(jnp.asarray, params)
  tx = builders.create_optimizer(config.optim)
  _, run_rng = jax.random.split(jax.random.PRNGKey(config.training.seed))
  state = checkpoints.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=run_rng,
  )
  manager = checkpoints.create_manager(workdir, keep=max(config.training.keep_checkpoints, 1))
  checkpoints.save(manager, state, config)
  manager.close()
  config_path = os.path.join(workdir, "config.py")
  body = pprint.pformat(_as_python(config.to_dict()), indent=1, width=100, sort_dicts=False)
  files.write_text(
      config_path,
      _CONFIG_PY.format(
          src=src,
          base=base or "configs/default.py",
          config_path=config_path,
          workdir=workdir,
          body=body,
      ),
  )
  return config_path


def convert(
    src: str,
    workdir: Optional[str] = None,
    config_name: Optional[str] = None,
    step: int = 0,
    verbose: bool = True,
):
  """Converts the diffusers folder ``src``; writes ``workdir`` when given.

  Returns (config, params, notes), params as float32 numpy arrays in our tree.
  """
  model_dir = find_model_dir(src)
  cfg = load_unet_config(model_dir)
  fields = model_fields_from_diffusers(cfg)
  if not config_name:
    config_name = guess_config_name(src, fields)
    if config_name and verbose:
      print(f"using --config_name={config_name} (from the folder name); pass another to override")
  scheduler = find_scheduler_config(src, model_dir)
  config, notes = build_config(fields, config_name, scheduler)
  config_validation.validate(config)
  model = builders.build_model(config)
  target = builders.abstract_params(model, config)
  tensors = load_tensors(model_dir)
  params = convert_tensors(tensors, target, len(fields["ch_mult"]), fields["num_res_blocks"])
  if verbose:
    print(
        f"converted {len(tensors)} tensors ({count_params(params):,} parameters) from {model_dir}"
    )
    for n in notes:
      print(n)
  if workdir:
    base = (
        f"configs/{config_name}.py"
        if config_name and not config_name.endswith(".py")
        else config_name
    )
    config_path = write_workdir(
        workdir, params, config, step=step, src=os.path.abspath(src), base=base or ""
    )
    if verbose:
      print(
          f"wrote the checkpoint (step {step}) and {config_path}; sample with:\n"
          f"  python main.py --mode=sample --config={config_path} --workdir={os.path.abspath(workdir)}"
      )
  return config, params, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_jax.convert",
      description="Convert a diffusers UNet2DModel folder (the released DDPM weights) into a "
      "checkpoint of this repo's U-Net.",
  )
  parser.add_argument(
      "--src",
      required=True,
      help="diffusers model folder (config.json + diffusion_pytorch_model."
      "safetensors) or pipeline folder (with unet/)",
  )
  parser.add_argument("--workdir", required=True, help="new workdir to write the checkpoint into")
  parser.add_argument(
      "--config_name",
      default="",
      help="configs/ module (e.g. ddpm_church256) or a config .py file; "
      "default: from the folder name, else configs/default.py",
  )
  parser.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
  args = parser.parse_args(argv)
  try:
    convert(args.src, args.workdir, args.config_name or None, step=args.step)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
