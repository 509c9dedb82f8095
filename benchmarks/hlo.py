"""Optimised HLO text, counted by operation kind (for the TPU program benchmarks)."""

from __future__ import annotations

import collections
import re

_OP = re.compile(r"=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+([a-z\-]+)\(")


def hlo_breakdown(text: str) -> dict:
  """{op kind: {'count', 'bytes', 'dtypes'}} over the instructions of optimised HLO text."""
  sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "s8": 1, "u8": 1}
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "dtypes": collections.Counter()})
  for line in text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    dtype, dims, op = m.groups()
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    kind = out[op]
    kind["count"] += 1
    kind["bytes"] += n * sizes.get(dtype, 4)
    kind["dtypes"][dtype] += 1
  return {k: dict(v, dtypes=dict(v["dtypes"])) for k, v in out.items()}


_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_cycles(text: str) -> list[dict]:
  """The TPU compiler's estimated cycles of each scheduled instruction of optimised HLO text.

  One dict per instruction that carries ``estimated_cycles`` in its backend
  config: cycles, the operation kind, the result type (e.g. 'bf16[16,32,32,128]')
  and the JAX op name it came from (its ``metadata.op_name``).
  """
  out = []
  for line in text.splitlines():
    c = _CYCLES.search(line)
    m = _OP.search(line)
    if not c or not m:
      continue
    name = _NAME.search(line)
    out.append(
        dict(
            cycles=int(c.group(1)),
            op=m.group(3),
            type=f"{m.group(1)}[{m.group(2)}]",
            op_name=name.group(1) if name else "",
        )
    )
  return out
