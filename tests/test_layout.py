"""The layout a newcomer meets: the top level holds what to read (the algorithms) and what to run (the scripts), and
dependencies run one way, scripts -> launch/ -> r2m.py, brme.py -> plumbing/: no import circles, no module or tool
that imports a script or a tool, nothing in plumbing/ that imports the algorithm, nothing below launch/ that
imports it. Read from the source (every import, those inside functions too), not by importing anything."""

import ast
import os

from helpers import ROOT

TOP_LEVEL = {"r2m.py", "brme.py", "train_tldr.py", "train_ultrafeedback.py", "eval_judge.py", "plot_run.py",
             "requirements.txt", "README.md"}
SCRIPTS = {"train_tldr", "train_ultrafeedback", "eval_judge", "plot_run"}
ALGORITHM = {"r2m", "brme"}


def project_modules() -> dict[str, str]:
    """module name -> path, for the top level, the two packages and the tools (benchmarks/, experiments/)."""
    found = {}
    for folder, prefix in (("", ""), ("plumbing", "plumbing."), ("launch", "launch."), ("benchmarks", "tools."),
                           ("experiments", "tools.")):
        for name in sorted(os.listdir(os.path.join(ROOT, folder) if folder else ROOT)):
            if name.endswith(".py"):
                module = prefix + name[:-3]
                found[module.removesuffix(".__init__")] = os.path.join(ROOT, folder, name)
    return found


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
    """The project modules a file imports, anywhere in it. A tool is imported by its bare name (its folder is on
    sys.path when tools use each other), so a bare name that is a tool counts as that tool."""
    tools = {m.split(".", 1)[1]: m for m in modules if m.startswith("tools.")}
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in modules and not name.startswith("tools."):
                out.add(name)
            elif name in tools:
                out.add(tools[name])
    return out


def test_the_top_level_shows_what_to_read_and_what_to_run():
    files = {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name)) and not name.startswith(".")}
    assert files == TOP_LEVEL, files ^ TOP_LEVEL
    for package in ("plumbing", "launch"):  # each package says what it holds
        assert ast.get_docstring(ast.parse(open(os.path.join(ROOT, package, "__init__.py")).read()))


def test_dependencies_run_one_way():
    modules = project_modules()
    graph = {m: imports_of(path, modules) - {m} for m, path in modules.items()}
    for module, imported in graph.items():
        assert not imported & SCRIPTS, f"{module} imports the script(s) {imported & SCRIPTS}"
        assert not {i for i in imported if i.startswith("tools.")}, f"{module} imports a tool: {imported}"
        if module.startswith("plumbing"):
            assert all(i.startswith("plumbing") for i in imported), f"{module} imports above plumbing/: {imported}"
        if module in ALGORITHM:
            assert not {i for i in imported if i.startswith("launch")}, f"{module} imports launch/: {imported}"
    assert graph["r2m"] <= {m for m in modules if m.startswith("plumbing")}  # the algorithm leans on plumbing only
    assert "r2m" in graph["brme"]
    # no circles: a depth-first search meets no module twice on one path
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_checker_sees_a_circle_and_a_script_import(tmp_path):
    """The checks above can fail: an import inside a function is seen, as is a tool imported by its bare name."""
    path = tmp_path / "example.py"
    path.write_text("import os\n\ndef f():\n    import train_tldr\n    from plumbing import data\n    import memory_plan\n")
    modules = project_modules()
    assert imports_of(str(path), modules) == {"train_tldr", "plumbing", "plumbing.data", "tools.memory_plan"}
