"""The package's layering: no import cycle, and jobs are leaves over the library."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("user_llm_jax", "data_pipelines")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
  """module -> project modules it imports (anywhere in the file, functions included)."""
  modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for target in targets:
        if target in modules and target != name:
          graph[name].add(target)
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle among non-package modules, or None.

  A package `__init__` re-exporting its submodules is not a dependency of those
  submodules, so edges into `__init__` modules are followed only from outside the package.
  """
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if (ROOT / nxt.replace(".", "/") / "__init__.py").exists():
        continue  # a package: its __init__ only re-exports
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = _cycle(_import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_jobs_import_no_other_job():
  graph = _import_graph()
  jobs = {m for m in graph if m.startswith("user_llm_jax.jobs.") and m != "user_llm_jax.jobs"}
  for job in sorted(jobs):
    others = sorted(graph[job] & jobs)
    assert not others, f"{job} imports the job module(s) {others}: move the shared code "
    "into the library"


def test_library_does_not_import_jobs():
  graph = _import_graph()
  for module, targets in sorted(graph.items()):
    if module.startswith("user_llm_jax.jobs") or module == "user_llm_jax":
      continue
    assert not any(t.startswith("user_llm_jax.jobs.") for t in targets), module


@pytest.mark.parametrize("module", ["user_llm_jax.jobs.main_pipeline",
                                    "user_llm_jax.jobs.generate", "user_llm_jax.models",
                                    "user_llm_jax.inference", "user_llm_jax.tasks.runner"])
def test_each_module_imports_alone(module):
  """A fresh interpreter imports the module first (an order-dependent cycle would fail)."""
  subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
