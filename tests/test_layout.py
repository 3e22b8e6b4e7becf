"""The layout a newcomer meets: the top level holds what to read (the algorithms) and what to run (the scripts), and
dependencies run one way, scripts -> launch/ -> r2m.py, brme.py -> plumbing/: no import circles, no module or tool
that imports a script or a tool, nothing in plumbing/ that imports the algorithm, nothing below launch/ that
imports it. Read from the source (every import, those inside functions too), not by importing anything."""

import ast
import os
import re

from helpers import ROOT

TOP_LEVEL = {"r2m.py", "baselines.py", "brme.py", "train_tldr.py", "train_ultrafeedback.py", "eval_judge.py", "plot_run.py",
             "requirements.txt", "README.md"}
SCRIPTS = {"train_tldr", "train_ultrafeedback", "eval_judge", "plot_run"}
ALGORITHM = {"r2m", "baselines", "brme"}


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
    assert "r2m" in graph["brme"] and "r2m" in graph["baselines"]
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


# ----------------------------------------------------------------------------------------------------
# r2m.py reads like a single-file reference: the budgets below keep it from growing back
# ----------------------------------------------------------------------------------------------------

R2M_LINES, STEP_LINES, FIRST_EQUATION_BY, LINE_LENGTH = 900, 550, 150, 120


def reached_lines(source: str, root: str) -> set[int]:
    """The lines of a module a reader meets following `root`: every top-level function it names (whole), every class
    it names (its header, docstring and fields; its __init__, forward and context-manager methods), every method of
    those classes called by name, every table it names, and so on from each of them."""
    tree = ast.parse(source)
    top = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    top[target.id] = node
    methods: dict[str, list[tuple[str, ast.FunctionDef]]] = {}  # method name -> (its class, its definition)
    for node in top.values():
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    methods.setdefault(item.name, []).append((node.name, item))

    def span(node) -> set[int]:
        return set(range(min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]),
                         node.end_lineno + 1))

    lines, done, todo = set(), set(), [("name", root)]

    def visit(node) -> None:
        lines.update(span(node))
        for x in ast.walk(node):
            if isinstance(x, ast.Name):
                todo.append(("name", x.id))
            elif isinstance(x, ast.Attribute):
                todo.append(("attr", x.attr))

    while todo:
        key = todo.pop()
        if key in done:
            continue
        done.add(key)
        kind, name = key
        if kind == "attr":
            for cls, method in methods.get(name, []):
                visit(method)
                todo.append(("name", cls))  # a method is read with its class
        elif isinstance(top.get(name), ast.ClassDef):
            cls = top[name]
            own = [i for i in cls.body if isinstance(i, ast.FunctionDef)]
            lines.update(span(cls) - set().union(set(), *[span(m) for m in own]))
            for stmt in cls.body:
                if isinstance(stmt, ast.AnnAssign):  # a field: its type and default, not its name
                    for part in (stmt.annotation, stmt.value):
                        if part is not None:
                            visit(part)
                elif not isinstance(stmt, ast.FunctionDef):
                    visit(stmt)
                elif stmt.name in ("__init__", "forward", "__call__", "__enter__", "__exit__"):
                    visit(stmt)
            for base in cls.bases:
                visit(base)
        elif name in top:
            visit(top[name])
    return lines


def test_r2m_py_is_the_algorithm_in_algorithm_1s_order_within_its_budgets():
    source = open(os.path.join(ROOT, "r2m.py")).read()
    lines = source.splitlines()
    assert len(lines) <= R2M_LINES, f"r2m.py has {len(lines)} lines (budget {R2M_LINES})"
    step = reached_lines(source, "rl_step")
    assert len(step) <= STEP_LINES, f"rl_step and what it reaches in r2m.py: {len(step)} lines (budget {STEP_LINES})"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > LINE_LENGTH]
    assert not long, f"r2m.py lines over {LINE_LENGTH} characters: {long}"
    # the first function that computes an equation (a `# Eq. n` comment in its body) starts early
    first = min(node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)
                and any(line.lstrip().startswith("# Eq.") for line in lines[node.lineno:node.end_lineno]))
    assert first <= FIRST_EQUATION_BY, f"the first equation's function starts at line {first}"
    # Algorithm 1's order: the hook, Eq. 3, Eq. 4, sampling, annotation, advantages, policy update, GREBT, the step
    order = ["R2MConfig", "HiddenStateCapture", "PolicyFeedbackAttention", "omega", "R2MRewardModel", "rollout",
             "annotate_rewards", "rloo_advantages", "policy_loss", "policy_update", "grebt_loss", "reward_model_update",
             "ALGOS", "REWARD_MODES", "rl_step", "train"]
    where = {}
    for node in ast.parse(source).body:
        for name in [getattr(node, "name", None)] + [t.id for t in getattr(node, "targets", [])
                                                     + [getattr(node, "target", None)] if isinstance(t, ast.Name)]:
            where.setdefault(name, node.lineno)
    assert [where[n] for n in order] == sorted(where[n] for n in order), {n: where[n] for n in order}


def test_the_budget_counter_follows_calls_methods_and_tables():
    """reached_lines can fail: it follows a function into what it calls, a class into its fields and called methods,
    a table into its rows' functions, and nothing else."""
    source = '''
def root(m):
    return helper(m) + TABLE["x"](m) + m.used()

def helper(m):
    return 1

def unused():
    return 2

def in_table(m):
    return 3

TABLE = {"x": in_table}

class Model:
    size: int = 1

    def __init__(self):
        pass

    def used(self):
        return 4

    def unused_method(self):
        return 5
'''
    lines = reached_lines(source, "root")
    text = source.splitlines()
    reached = {text[i - 1].strip() for i in lines}
    assert {"def helper(m):", "def in_table(m):", "def used(self):", "class Model:"} <= reached
    assert not {"def unused():", "def unused_method(self):"} & reached


def test_no_file_cites_a_document_readers_do_not_have():
    found = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in (".git", "__pycache__", "runs", "data", "world")]
        for name in names:
            if name.endswith((".py", ".md", ".txt", ".json", ".yaml", ".yml")) or name == "run":
                text = open(os.path.join(folder, name), errors="replace").read()
                if re.search(r"\bSPEC\b", text):
                    found.append(os.path.relpath(os.path.join(folder, name), ROOT))
    assert not found, found
