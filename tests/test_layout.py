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
    # the stand-in, installed at the first import of detectron2: nothing heavy until needed
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


# ---------------------------------------------------------------- state in the open
def test_importing_the_packages_changes_no_environment_variable():
    """(The libraries they use set some of their own when imported: those are imported
    first.)"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, torch, torchvision, cv2, detectron2.engine, detectron2.data; "
            "before = dict(os.environ); import transfer, pretrain, convert, results, "
            "transfer.train_net, pretrain.main_moco, tools.demo, tools.suite; "
            "print(os.environ.get('OMP_WAIT_POLICY'), dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]


def _assigns_process_state(node):
    """os.environ[...] = / del os.environ[...] / os.environ.update|setdefault|pop|clear(...),
    os.putenv / os.unsetenv, and sys.stdout|stderr = ..."""
    def is_attr(n, mod, name):
        return isinstance(n, ast.Attribute) and n.attr == name and \
            isinstance(n.value, ast.Name) and n.value.id == mod

    targets = []
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
    for t in targets:
        if isinstance(t, ast.Subscript) and is_attr(t.value, "os", "environ"):
            return True
        if is_attr(t, "sys", "stdout") or is_attr(t, "sys", "stderr") or \
                is_attr(t, "os", "environ"):
            return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        if is_attr(f.value, "os", "environ") and f.attr in ("update", "setdefault", "pop",
                                                            "clear", "__setitem__"):
            return True
        if isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr in ("putenv",
                                                                               "unsetenv"):
            return True
    return False


def test_no_module_assigns_the_environment_or_stdout():
    """Process-wide state is given to a program as flags and to the programs it starts on
    their command lines (convert/runtime.py): no project module writes os.environ or replaces
    sys.stdout (contextlib.redirect_stdout scopes a redirection to a block)."""
    found = [f"{rel}:{node.lineno}" for rel, path in modules()
             for node in ast.walk(ast.parse(open(path).read())) if _assigns_process_state(node)]
    assert found == []


def test_no_module_global_carries_data_between_modules():
    """Module-level names assigned a mutable container that a function then changes in place
    (a cache or hand-over between modules): none, but for registries, which only their
    ``register*`` functions fill, at import (detectron2's own pattern)."""
    found = []
    for rel, path in modules():
        tree = ast.parse(open(path).read())
        mutable = {t.id for n in tree.body if isinstance(n, ast.Assign)
                   and isinstance(n.value, (ast.Dict, ast.List, ast.Set))
                   for t in n.targets if isinstance(t, ast.Name)}
        for fn in (n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                          ast.ClassDef))
                   and not n.name.startswith("register")):
            for node in ast.walk(fn):
                changed = None
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        isinstance(node.func.value, ast.Name) and node.func.attr in (
                            "append", "update", "clear", "pop", "setdefault", "add", "extend"):
                    changed = node.func.value.id
                elif isinstance(node, (ast.Assign, ast.AugAssign)):
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                        if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                            changed = t.value.id
                if changed in mutable and changed not in {a.arg for a in fn.args.args}:
                    found.append(f"{rel}:{node.lineno} changes the module's {changed}")
    assert found == []
