"""Config files and command-line overrides, with every mistake reported as one line.

``python main.py --config=configs/cifar10.py --config.training.batch_size=64``:
the file is a Python module whose ``get_config()`` returns an
``ml_collections.ConfigDict``; each ``--config.SECTION.FIELD=VALUE`` sets a
field that the config already has, parsed as the field's type. Anything that
goes wrong (a missing file, a syntax error, an exception while importing or
calling ``get_config``, a wrong return type, an unknown field, a value of the
wrong type) raises ``ConfigError`` naming the file, line or field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
import traceback
from typing import Any, Sequence

import ml_collections

from ddpm_jax import errors

OVERRIDE_PREFIX = "--config."


def _where(error: BaseException, path: str) -> str:
  """'file:line' of the innermost frame in the config file (else the innermost frame)."""
  if isinstance(error, SyntaxError) and error.filename:
    return f"{error.filename}:{error.lineno}"
  frames = traceback.extract_tb(error.__traceback__)
  in_file = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
  frame = (in_file or frames or [None])[-1]
  return f"{frame.filename}:{frame.lineno}" if frame else path


def _import_package_of(path: str) -> None:
  """Imports the directory of a config file as the package of its name, if it is one.

  Experiment files import their neighbours (configs/cifar10.py: ``from configs
  import default``). Rather than putting the repository on ``sys.path``, a
  directory with an ``__init__.py`` is imported under its own name, from that
  directory, unless a package of that name is already imported (which then
  serves the imports, as a first import would have from ``sys.path``).
  """
  directory = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(directory)
  init = os.path.join(directory, "__init__.py")
  if not name.isidentifier() or name in sys.modules or not os.path.isfile(init):
    return
  spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[directory])
  package = importlib.util.module_from_spec(spec)
  sys.modules[name] = package
  try:
    spec.loader.exec_module(package)
  except BaseException:
    del sys.modules[name]
    raise


def load_file(path: str, flag: str = "") -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``path``; ConfigError on any failure.

  ``flag`` starts the error messages (default ``--config=PATH``). The file may
  import its neighbours as modules of its directory's package (``from configs
  import default``) from any working directory.
  """
  flag = flag or f"--config={path}"
  if not os.path.isfile(path):
    raise errors.ConfigError(f"{flag}: no such file")
  name = "_ddpm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  try:
    _import_package_of(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise errors.ConfigError(f"{flag}: the file defines no get_config()")
    config = get_config()
  except errors.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = getattr(e, "msg", None) if isinstance(e, SyntaxError) else str(e)
    raise errors.ConfigError(f"{flag}: {_where(e, path)}: {type(e).__name__}: {message}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(
        f"{flag}: get_config() returned {type(config).__name__}, not an "
        "ml_collections.ConfigDict"
    )
  return config


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_fields(value, f"{prefix}{key}."))
  return out


def _unknown(config, dotted: str) -> errors.ConfigError:
  close = difflib.get_close_matches(dotted, _fields(config), n=1, cutoff=0.6)
  hint = f" (did you mean {OVERRIDE_PREFIX}{close[0]}?)" if close else ""
  return errors.ConfigError(
      f"{OVERRIDE_PREFIX}{dotted}: the config has no field {dotted!r}{hint}; "
      "the fields are listed in ddpm_jax/config_schema.py"
  )


def parse_value(current: Any, text: str, flag: str) -> Any:
  """``text`` parsed as the type of the field's ``current`` value; ConfigError if it is not one."""

  def bad(kind):
    return errors.ConfigError(f"{flag}={text}: not {kind}")

  if isinstance(current, bool):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in value:
      raise bad("True or False")
    return value[text.lower()]
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise bad(f"a Python literal of the field's type ({type(current).__name__})") from None
  if isinstance(current, (tuple, list)):
    value = value if isinstance(value, (tuple, list)) else (value,)
    return type(current)(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Sets each ``--config.a.b=value`` (or ``--config.a.b`` for True) on ``config`` in place."""
  for arg in overrides:
    if not arg.startswith(OVERRIDE_PREFIX):
      raise errors.ConfigError(
          f"unexpected argument {arg!r}; config fields are set with "
          f"{OVERRIDE_PREFIX}SECTION.FIELD=VALUE"
      )
    flag, has_value, text = arg.partition("=")
    dotted = flag[len(OVERRIDE_PREFIX) :]
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise _unknown(config, dotted)
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise _unknown(config, dotted)
    if not has_value:
      if not isinstance(node[leaf], bool):
        raise errors.ConfigError(f"{flag}: needs a value ({flag}=VALUE)")
      text = "true"
    value = parse_value(node[leaf], text, flag)
    try:
      node[leaf] = value
    except TypeError as e:
      raise errors.ConfigError(f"{flag}={text}: {e}") from None


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of file ``path`` with ``overrides`` applied, locked (no new fields)."""
  config = load_file(path)
  apply_overrides(config, overrides)
  config.lock()
  return config
