"""The package's shape: modules of a readable size, long functions explained, no import circles, and no
dependence on Snakemake (the workflow imports the package, never the other way)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "crystal_transfer"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # the comment a longer function carries, saying why it is long


def _modules() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _top_level_imports(path: Path, module: str) -> set[str]:
    """Package modules imported when ``module`` is imported (not the imports inside functions)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("crystal_transfer")}


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_functions_over_60_lines_say_why() -> None:
    unexplained = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not any(line.strip().startswith(LONG_MARK) for line in body):
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({len(body)} lines)")
    assert not unexplained, unexplained


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _top_level_imports(path, name) if m in modules and m != name}
    visiting, done, cycles = set(), set(), []

    def visit(name: str, stack: list[str]) -> None:
        visiting.add(name)
        for target in sorted(graph[name]):
            if target in visiting:
                cycles.append(stack[stack.index(target) :] + [target] if target in stack else [name, target])
            elif target not in done:
                visit(target, [*stack, target])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, cycles


def test_the_package_never_imports_snakemake() -> None:
    offenders = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "snakemake" for name in names):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
