"""Imports flow one way: core -> data / models / optim -> train / gan -> pipeline -> config -> main
-> ablate.

Every import of an mdjax module is read from the source with `ast`, function-level ones included,
so a cycle cannot hide behind a late import; and each package is imported alone in a fresh
interpreter, which a package that only works after another one was imported would fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mdjax")
# Each top-level part of mdjax and its layer: a module may import its own part and lower layers,
# never a higher layer nor a sibling of its own layer.
LAYERS = {"errors": 0, "core": 1, "data": 2, "models": 2, "optim": 2, "train": 3, "gan": 3,
          "pipeline": 4, "config": 5, "main": 6, "ablate": 7}
PACKAGES = ["core", "data", "models", "optim", "train", "gan", "pipeline"]


def module_names() -> dict[str, str]:
  """{dotted module name: file path} for every module of mdjax."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
  return out


def imported_modules(path: str, modules: dict[str, str]) -> set[str]:
  """The mdjax modules that `path` imports anywhere in its body (top level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == "mdjax")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.split(".")[0] == "mdjax":
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.add(sub if sub in modules else node.module)
  return found


def part(module: str) -> str:
  return module.split(".")[1] if "." in module else ""


def import_graph() -> dict[str, set[str]]:
  modules = module_names()
  return {m: imported_modules(p, modules) - {m} for m, p in modules.items()}


def test_the_reader_sees_function_level_imports(tmp_path):
  """The checks below rely on it: a late import counts like a top-level one."""
  source = tmp_path / "m.py"
  source.write_text("import os\n\ndef f():\n  from mdjax.gan import ensemble\n"
                    "  import mdjax.pipeline.run\n  from mdjax.train.steps import TrainState\n")
  modules = {"mdjax.gan.ensemble": "", "mdjax.train.steps": ""}
  assert imported_modules(str(source), modules) == {"mdjax.gan.ensemble", "mdjax.pipeline.run",
                                                    "mdjax.train.steps"}


def test_no_module_imports_a_higher_layer_or_a_sibling():
  graph = import_graph()
  assert set(map(part, graph)) - {""} <= set(LAYERS)  # a new package must be given its layer
  bad = sorted(f"{m} imports {dep}" for m, deps in graph.items() for dep in deps
               if part(m) and part(dep) and part(dep) != part(m)
               and LAYERS[part(dep)] >= LAYERS[part(m)])
  assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
  graph = import_graph()
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    for dep in sorted(graph.get(m, ())):
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_package_imports_alone_in_a_fresh_interpreter():
  modules = module_names()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = {}
  for name in PACKAGES:
    mods = sorted(m for m in modules if part(m) == name)
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    procs[name] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  failed = {}
  for name, proc in procs.items():
    out = proc.communicate(timeout=300)[0]
    if proc.returncode:
      failed[name] = out[-2000:]
  assert not failed, failed


@pytest.mark.parametrize("package", ["core", "pipeline"])
def test_layer_order_is_what_the_packages_say(package):
  """core imports no other part of mdjax but errors; the pipeline no longer imports config."""
  graph = import_graph()
  deps = {part(d) for m, ds in graph.items() if part(m) == package for d in ds} - {package}
  assert deps <= ({"errors"} if package == "core" else set(LAYERS) - {"config", "main"})
