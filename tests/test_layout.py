"""The layout's rules, read from the source: imports run one way along the pipeline
(convert <- pretrain, convert <- transfer <- tools, results <- tools), no module imports itself
back through others, and project imports sit at the top of modules."""
import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

STAGES = ("convert", "pretrain", "transfer", "results", "tools")
# what each stage may import besides itself
MAY_IMPORT = {"convert": set(), "pretrain": {"convert"}, "transfer": {"convert"},
              "results": {"convert"}, "tools": {"convert", "pretrain", "transfer", "results"}}
# project imports inside functions, each for a reason other than dodging a circle
LAZY = {
    # the import hook runs at every interpreter start: nothing heavy until it is needed
    ("transfer/d2.py", "transfer.fast_eval"),
    # doctor reports a broken install, so it imports the harness only after checking it
    ("tools/doctor.py", "transfer.densepose.config"), ("tools/doctor.py", "transfer.densepose.gps"),
    ("tools/doctor.py", "transfer.d2"), ("tools/doctor.py", "transfer"),
    ("tools/doctor.py", "transfer.config"), ("tools/doctor.py", "transfer.configs"),
}


def modules():
    for stage in STAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, stage)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    yield os.path.relpath(path, ROOT), path


def module_name(rel):
    name = rel[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def project_imports(path):
    """(imported module, at top level?) for every import of a project module."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in STAGES:
                yield name, id(node) in top


def test_imports_run_one_way_along_the_pipeline():
    wrong = []
    for rel, path in modules():
        stage = rel.split(os.sep)[0]
        for name, _ in project_imports(path):
            target = name.split(".")[0]
            if target != stage and target not in MAY_IMPORT[stage]:
                wrong.append(f"{rel} imports {name}")
    assert wrong == []


def test_project_imports_are_at_module_level():
    inside = sorted({(rel, name) for rel, path in modules()
                     for name, at_top in project_imports(path) if not at_top} - LAZY)
    # an ImportFrom yields the module and module.name: keep the ones that are modules
    inside = [(r, n) for r, n in inside if (r, n.rsplit(".", 1)[0]) not in LAZY]
    assert inside == []


def test_no_import_circles():
    known = {module_name(rel): path for rel, path in modules()}
    graph = {m: {n for n, _ in project_imports(p) if n in known and n != m}
             for m, p in known.items()}
    # a package imports its submodules on purpose (registration); only cycles through a
    # non-parent edge count
    for m in graph:
        graph[m] = {n for n in graph[m] if not m.startswith(n + ".")}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_each_folder_says_what_lives_there():
    for package in ("convert", "pretrain", "transfer", "results", "tools", "tools/fixtures",
                    "transfer/configs", "transfer/densepose"):
        init = os.path.join(ROOT, package, "__init__.py")
        doc = ast.get_docstring(ast.parse(open(init).read()))
        assert doc and len(doc) > 20, package


def test_transfer_imports_without_pretrain_or_results():
    """The transfer stage, loaded whole, pulls in no other stage but convert."""
    code = ("import sys, transfer.train_net, transfer.tasks; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pretrain', 'results', 'tools', 'convert'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['convert']"
