"""The shape of the code (README "Layout, and how to copy a script"): the project's modules import one another without
a cycle, imports inside functions included; the core (`common/`) never imports the data loaders or the robot
interface; the robot interface stands alone; and the copy recipe runs: `dppo_finetune.py` copied with exactly what
the README names runs one Avoid iteration in an empty folder, loading at most 2,600 lines of non-script code."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("common", "sims", "loaders", "hardware")
TOOL_FOLDERS = ("scripts", "benchmarks")
# README "Layout, and how to copy a script": what `dppo_finetune.py` needs for the default Avoid run
AVOID_RECIPE = ("dppo_finetune.py", "common", "sims/__init__.py", "sims/avoid.py", "sims/plots.py",
                "checkpoints/avoid-m2_diffusion.pt")
MAX_LOADED_LINES = 2600


def project_modules() -> dict[str, Path]:
    """Every module of the project by its import name: the top-level scripts, the code folders and the tool folders
    (not the tests)."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in CODE_FOLDERS + TOOL_FOLDERS:
        for p in sorted((ROOT / folder).glob("*.py")):
            modules[folder if p.stem == "__init__" else f"{folder}.{p.stem}"] = p
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import statement of the module names, anywhere in it (inside functions too): `import a.b`
    gives a.b, `from a import b` gives a and a.b (b may be a module), relative imports resolved against the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):  # importlib.import_module("a.b"): a and a.b
            names.update({node.args[0].value, node.args[0].value.rpartition(".")[0]} - {""})
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (itself excluded)."""
    modules = project_modules()
    return {name: {n for n in imported_names(name, path) if n in modules and n != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search; a grey node met again closes a cycle)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: an import inside a function closes a cycle it reports, with its modules in order."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("def g():\n    from a import x\n")
    graph = {m: {n for n in imported_names(m, tmp_path / f"{m}.py") if n in "abc"} for m in "abc"}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert imported_names("common.x", Path(__file__)) >= {"ast", "pathlib", "pathlib.Path"}


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert {"common.runs", "common.envs", "sims.avoid", "loaders.convert", "hardware.robot", "dppo_finetune"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_the_loaders_and_the_robot_interface_stands_alone():
    graph = import_graph()
    for name, deps in graph.items():
        if name.split(".")[0] == "common":
            assert not {d for d in deps if d.split(".")[0] in ("loaders", "hardware")}, name
    # the robot interface: the errors and the rotations of the core, never a simulator or the run plumbing
    assert graph["hardware.robot"] <= {"common", "common.errors", "common.rotations"}
    # the loaders and the simulators are imported by the core only lazily, never at the top of a module
    for name in ("common.envs", "common.runs", "common.vecenv"):
        tree = ast.parse(project_modules()[name].read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not {m for m in top if m and m.split(".")[0] in ("sims", "loaders")}, name


WRAPPER = """
import json, os, runpy, sys
sys.argv = ["dppo_finetune.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("dppo_finetune.py", run_name="__main__")
finally:
    here = os.path.abspath(".")
    files = {m.__file__ for m in list(sys.modules.values()) if os.path.isabs(getattr(m, "__file__", None) or "")}
    mine = sorted(os.path.relpath(f, here) for f in files if f.startswith(here + os.sep))
    print("LOADED " + json.dumps(mine))
"""


def test_copy_recipe_runs_one_avoid_iteration_loading_at_most_2600_lines(tmp_path):
    """The README's recipe for `dppo_finetune.py` on Avoid, copied into an empty folder with nothing else on the path:
    one iteration (with the before/after picture) exits 0, and the project code it loaded beside the script (the core
    and the Avoid simulator) is at most MAX_LOADED_LINES lines; the data loaders and video are never loaded."""
    for item in AVOID_RECIPE:
        src, dest = ROOT / item, tmp_path / item
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest)
    flags = ["--n-train-itr", "1", "--n-critic-warmup-itr", "0",
             "--num-envs", "4", "--n-steps", "5", "--batch-size", "50", "--torch-threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(flags)], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.rsplit("LOADED ", 1)[1])
    code = [f for f in loaded if f != "dppo_finetune.py"]
    assert "sims/avoid.py" in code and "common/runs.py" in code and not any(f.startswith("loaders") for f in code)
    assert "sims/video.py" not in code  # no --capture-video
    lines = sum(len((tmp_path / f).read_text().splitlines()) for f in code)
    print(f"loaded {lines} lines of non-script project code: {', '.join(code)}")
    assert lines <= MAX_LOADED_LINES, code
    assert list(tmp_path.glob("runs/*/trajectories.png")) and list(tmp_path.glob("runs/*/eval.csv"))


def test_the_core_never_reads_a_scripts_flag_by_name():
    """`common/` gets explicit values: no `args.<flag>` or `getattr(args, ...)` on a script's `Args` (a parameter named
    `args` or `config`) anywhere in it; `Run` and `RunFolder` only record the whole `config`."""
    reads = []
    for path in sorted((ROOT / "common").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("args", "config"):
                reads.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ("args", "config")
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
                reads.append(f"{path.name}:{node.lineno} {node.func.id}({node.args[0].id}, {node.args[1].value!r})")
    assert reads == []


def test_a_dynamic_import_is_an_import():
    """`importlib.import_module("loaders.convert")` (how the scripts hand over the reference conversion) counts as an
    import of loaders.convert, so the cycle check sees it."""
    assert {"loaders", "loaders.convert"} <= imported_names("dppo_finetune", ROOT / "dppo_finetune.py")
