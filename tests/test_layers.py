"""The package's layers only look down, and no module imports itself back through others.

Every `import synth_med...` in every module counts, at module level and inside functions alike.
Layers, bottom to top: errors and infra; data; ops; models; diffusion and objectives; train;
evaluation; analysis; configuration and experiments.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "synth_med")
RANK = {"__init__": 0, "errors": 0, "infra": 0, "data": 1, "ops": 2, "models": 3, "diffusion": 4,
        "objectives": 4, "train": 5, "evaluation": 6, "analysis": 7, "configuration": 8, "experiments": 8}


def module_names() -> dict[str, str]:
  """{dotted module name: file path} for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules a file imports (a `from pkg import name` that names a module counts as it)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("synth_med"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("synth_med"))
  return {m for m in out if m in modules}


def layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
  modules = module_names()
  return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_module_has_a_layer():
  assert {layer(m) for m in graph()} <= set(RANK), {layer(m) for m in graph()} - set(RANK)


def test_no_upward_import():
  upward = sorted(f"{m} -> {t}" for m, ts in graph().items() for t in ts if RANK[layer(t)] > RANK[layer(m)])
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  g = graph()
  state: dict[str, int] = {}
  cycles = []

  def visit(m: str, stack: list[str]) -> None:
    state[m] = 1
    for t in sorted(g[m]):
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack + [t])
    state[m] = 2

  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_sees_function_level_imports_and_submodules():
  modules = {"synth_med.a": "", "synth_med.b": "", "synth_med.b.c": ""}
  import tempfile
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write("from synth_med import a\n\ndef g():\n  from synth_med.b import c\n  import synth_med.b\n")
  try:
    assert imports_of(f.name, modules) == {"synth_med.a", "synth_med.b.c", "synth_med.b"}
  finally:
    os.unlink(f.name)
