"""The shape of the code base: a one-way import graph, a thin main.py, one config schema, one style.

These read the source as text (``ast``), so they run in a second and need no JAX.
"""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ddpm_jax")


def _modules():
  """{'ddpm_jax.x.y': path} of every module in the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
        out[module.removesuffix(".__init__")] = path
  return out


def import_graph():
  """{module: set of package modules it imports} (``import a.b`` and ``from a import b``)."""
  modules = _modules()
  edges = {m: set() for m in modules}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in subs if n in modules] or [node.module]
      edges[module] |= {n for n in names if n in modules and n != module}
  return edges


def find_cycle(edges):
  """One import cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        return stack[stack.index(n) :] + [n]
      if n not in state:
        cycle = visit(n)
        if cycle:
          return cycle
    state[m] = "done"
    stack.pop()
    return None

  for m in sorted(edges):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
  edges = import_graph()
  assert len(edges) > 30  # the walk found the package
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def layer_table():
  """[[names of one line], ...] of the table in ddpm_jax/__init__.py's docstring, top first."""
  with open(os.path.join(PACKAGE, "__init__.py")) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  lines = doc.split("\n")
  start = next(i for i, l in enumerate(lines) if l.startswith("Layers"))
  rows = [l for l in lines[start:] if l.startswith("  ")]
  return [re.split(r"\s{2,}", l.strip())[0].split(", ") for l in rows]


def _layer_of(module, table):
  """Index of the line of ``table`` that names ``module`` ('ddpm_jax.a.b' is named by 'a')."""
  name = module.split(".")[1]
  return next((i for i, names in enumerate(table) if name in names), None)


def test_each_module_imports_only_the_layers_above_it():
  """The layer table of ddpm_jax/__init__.py is what the code does, package by package."""
  table = layer_table()
  assert ["errors"] in table and ["compile_check"] in table and len(table) >= 12
  edges = import_graph()
  unlisted = [m for m in edges if m != "ddpm_jax" and _layer_of(m, table) is None]
  assert not unlisted, f"modules the table of ddpm_jax/__init__.py does not place: {unlisted}"
  wrong = []
  for module, imported in edges.items():
    if module == "ddpm_jax":
      continue
    for other in imported:
      same_package = module.split(".")[1] == other.split(".")[1]
      if not same_package and _layer_of(other, table) >= _layer_of(module, table):
        wrong.append(f"{module} imports {other}")
  assert not wrong, sorted(wrong)


def test_the_layer_check_sees_a_wrong_way_import(monkeypatch):
  """An import of a lower line, or of a line's neighbour, is reported."""
  table = [["errors"], ["builders"], ["training", "evaluation"]]
  assert _layer_of("ddpm_jax.training.loop", table) == 2
  assert _layer_of("ddpm_jax.builders", table) == 1
  assert _layer_of("ddpm_jax.nowhere", table) is None
  assert not _layer_of("ddpm_jax.evaluation.fid", table) > _layer_of(
      "ddpm_jax.training.step", table
  )


def test_the_programs_other_than_training_do_not_import_training():
  """Sampling, evaluation and the converter start from the builders, not from training/."""
  for module, imported in import_graph().items():
    if module.startswith(("ddpm_jax.sample", "ddpm_jax.evaluation", "ddpm_jax.convert")):
      assert not [m for m in imported if m.startswith("ddpm_jax.training")], module


def test_the_core_knows_nothing_of_flax_nor_of_the_programs():
  """diffusion/ and cpu/ are pure JAX; the model never imports the diffusion process."""
  modules = _modules()
  for module, path in modules.items():
    with open(path) as f:
      text = f.read()
    if module.startswith(("ddpm_jax.diffusion", "ddpm_jax.cpu")):
      assert not re.search(r"^\s*(import flax|from flax)", text, re.M), module
      assert not re.search(r"^\s*from ddpm_jax(\.(models|training|data|evaluation))", text, re.M)
    if module.startswith("ddpm_jax.models"):
      assert "ddpm_jax.diffusion" not in text, module


def test_main_is_thin():
  with open(os.path.join(ROOT, "main.py")) as f:
    lines = f.read().splitlines()
  assert len(lines) <= 80, len(lines)


def test_the_library_reads_no_config_field_with_get():
  """Every field is defined in config_schema.py, so the library reads them as attributes."""
  offenders = []
  for module, path in _modules().items():
    with open(path) as f:
      for i, line in enumerate(f, 1):
        if re.search(r"\b(config|ev|s|t|m|data_config|tcfg)\.get\(", line):
          offenders.append(f"{module}:{i}: {line.strip()}")
  assert not offenders, offenders


def test_every_default_field_has_a_comment():
  """ddpm_jax/config_schema.py: each field's line is preceded by its comment."""
  with open(os.path.join(PACKAGE, "config_schema.py")) as f:
    lines = f.read().splitlines()
  fields = [i for i, l in enumerate(lines) if re.match(r"\s+\w+\.\w+ = ", l)]
  assert len(fields) > 60
  uncommented = [lines[i] for i in fields if not lines[i - 1].strip().startswith("#")]
  assert not uncommented, uncommented


def test_the_library_needs_no_checkout():
  """No module edits sys.path nor imports the repository's configs/ (an installed package works)."""
  offenders = []
  for module, path in _modules().items():
    with open(path) as f:
      text = f.read()
    for pattern in (
        r"sys\.path\.(insert|append|extend)|sys\.path\s*=",
        r"^\s*(from|import) configs\b",
    ):
      offenders += [f"{module}: {m.group(0)}" for m in re.finditer(pattern, text, re.M)]
  assert not offenders, offenders


def test_every_file_is_formatted_with_pyink():
  """One formatter (pyproject.toml's [tool.pyink]) for every Python file."""
  r = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--quiet", "."],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
