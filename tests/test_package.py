"""The package's shape, read from its source with `ast`: no import cycles among apex_hf's modules, counting the imports
inside functions too (a cycle there waits for the first call), and pre-training and post-training never import each
other."""

import ast
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
# package name -> its folder (setup.cfg's package_dir: the model lives outside src/)
PACKAGE_ROOTS = {"apex_hf": REPO_ROOT / "src" / "apex_hf", "apex_hf.modeling": REPO_ROOT / "modeling"}
WINGS = ("apex_hf.pretrain", "apex_hf.posttrain")


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py file under the roots (a package is its __init__.py)."""
    modules = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every absolute module name an import statement of the file names, with `from X import y` naming X and X.y."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_files(roots)
    return {name: (imported_names(name, path) & modules.keys()) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle, as its modules with the first repeated at the end, or None."""
    finished, path = set(), []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                return path[path.index(imported) :] + [imported]
            if imported not in finished and (cycle := visit(imported)):
                return cycle
        path.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        if module not in finished and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles_among_the_modules():
    graph = import_graph(PACKAGE_ROOTS)
    assert "apex_hf.posttrain.lora" in graph["apex_hf.registration"]  # imported inside a function: counted
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pretraining_and_posttraining_do_not_import_each_other():
    graph = import_graph(PACKAGE_ROOTS)
    crossings = [
        f"{module} -> {imported}"
        for module, imports in graph.items()
        for imported in imports
        for wing, other in (WINGS, WINGS[::-1])
        if module.startswith(wing) and imported.startswith(other)
    ]
    assert not crossings


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "recipe.py").write_text("def check():\n    from .lora import build\n")
    (tmp_path / "lora.py").write_text("from .recipe import check\n")
    (tmp_path / "other.py").write_text("import os\nfrom . import recipe\n")
    assert find_cycle(import_graph({"pkg": tmp_path})) == ["pkg.lora", "pkg.recipe", "pkg.lora"]
