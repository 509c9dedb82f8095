"""The package as a user installs it: a wheel in a fresh virtualenv, used from another directory."""

import glob
import os
import shutil
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kwargs):
  # Without conftest's PYTHONPATH (the checkout): through it pip would find this checkout's
  # ddpm_jax.egg-info and take the wheel as already installed.
  kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return r.stdout


@pytest.mark.slow
def test_an_installed_wheel_validates_a_repository_config_from_another_directory(tmp_path):
  """The schema is in the package and nothing edits sys.path: a user's config that starts from
  it, and configs/cifar10.py, load and are checked by the installed library, from a directory
  that is not the repository."""
  pytest.importorskip("setuptools")
  src = tmp_path / "src"  # the package's files only: the build writes nothing into the checkout
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src)
  shutil.copytree(
      os.path.join(ROOT, "ddpm_jax"), src / "ddpm_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  dist = tmp_path / "dist"
  _run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
      + ["--no-index", "-w", str(dist), str(src)]
  )
  (wheel,) = glob.glob(str(dist / "ddpm_jax-*.whl"))

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  python = str(venv / "bin" / "python")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel])
  # The dependencies (jax, ml_collections, ...) from this interpreter's site-packages, listed
  # after the virtualenv's own: its .pth files are not read, so no other ddpm_jax is found.
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
  with open(os.path.join(purelib.strip(), "dependencies.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")

  cifar10 = os.path.join(ROOT, "configs", "cifar10.py")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # A user's own config, outside any checkout, starts from the schema in the package.
  (elsewhere / "mine.py").write_text(
      "from ddpm_jax import config_schema\n\n\ndef get_config():\n"
      "  config = config_schema.get_config()\n  config.data.dataset = 'digits'\n"
      "  config.data.image_size, config.data.channels = 8, 1\n"
      "  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)\n"
      "  return config\n"
  )
  code = f"""
import sys
import ddpm_jax
from ddpm_jax import config_loading, config_validation, errors
config_validation.validate(config_loading.load("mine.py"), 8, 8)
assert "configs" not in sys.modules
config = config_loading.load({cifar10!r}, ["--config.training.batch_size=64"])
config_validation.validate(config, 8, 8)
print(ddpm_jax.__file__)
print(sys.modules["configs"].__file__)
print(config.training.batch_size, config.model.ch, config.data.dataset)
try:
  config_validation.validate(config_loading.load({cifar10!r}, ["--config.training.batch_size=7"]), 8)
except errors.ConfigError as e:
  print("ConfigError:", e)
"""
  lines = _run([python, "-c", code], cwd=elsewhere).splitlines()
  assert lines[0].startswith(str(venv)) and lines[0].endswith(
      os.path.join("ddpm_jax", "__init__.py")
  )
  assert lines[1] == os.path.join(ROOT, "configs", "__init__.py")
  assert lines[2] == "64 128 cifar10"
  assert lines[3].startswith("ConfigError: config.training.batch_size=7 is invalid"), lines[3]
