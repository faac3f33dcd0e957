"""Every command the docs show works (issue #41).

The fenced commands of README.md and docs/*.md are collected. The cheap ones run (`--help`,
`DRY_RUN=1`, `make tasks`, `make doctor`); every other one is checked against the real
interfaces, read from the sources, never from a list kept here: each `make` target against the
Makefile's targets, each `VAR=` against the variables that target's recipe reads (directly or
through another variable), each flag against its program's argparse parser (the program a make
target runs is read from its recipe), each environment variable against the project's sources.
Every link between README.md and docs/ resolves, and every docs page is linked from the README.
A control feeds misspelled targets, variables, flags and links through the same checks.
"""
import argparse
import concurrent.futures
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROGRAMS = ("make", "python", "python3", ".venv/bin/python", "torchrun")
CHEAP_TARGETS = ("tasks", "doctor")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files(root=ROOT):
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs",
                                                                             "*.md")))


def fenced_commands(text):
    """The command lines of the fenced blocks (``` ... ```), continuation lines joined, as
    token lists (comments dropped); lines that are not commands (output, layouts) are not."""
    commands, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if program_index(tokens) is not None:
            commands.append(tokens)
    return commands


def program_index(tokens):
    """Index of the program in `tokens` (after leading VAR=value environment assignments)."""
    for i, token in enumerate(tokens):
        if ASSIGNMENT.match(token):
            continue
        return i if token in PROGRAMS else None
    return None


class Makefile:
    """Targets, variable definitions and the variables and program of each target's recipe."""

    def __init__(self, path):
        self.definitions, self.recipes = {}, {}
        target = None
        for line in open(path).read().replace("\\\n", " ").splitlines():
            if line.startswith("\t") and target:
                self.recipes[target] += line + "\n"
                continue
            target = None
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?|:|\+)?=(.*)$", line)
            if m:
                self.definitions[m.group(1)] = m.group(3)
                continue
            m = re.match(r"^([a-z][a-z0-9-]*)\s*:(?!=)(.*)$", line)
            if m and not line.startswith(".PHONY"):
                target = m.group(1)
                self.recipes[target] = m.group(2) + "\n"  # prerequisites read variables too

    def variables(self, target):
        """Every variable the target's recipe and prerequisites read, through definitions."""
        seen, todo = set(), re.findall(r"\$\((\w+)\)", self.recipes[target])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += re.findall(r"\$\((\w+)\)", self.definitions.get(name, ""))
        return seen

    def program(self, target):
        """The module (or script) the target's recipe runs, or None."""
        m = re.search(r" -m ([\w.]+)", self.recipes[target]) or \
            re.search(r"\$\(PYTHON\) ([\w/]+\.py)", self.recipes[target])
        return None if m is None else m.group(1)


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(program):
    """The argparse parser of a module (`pkg.mod`) or script (`dir/mod.py`), obtained without
    running the program: its get_parser()/build_parser()/get_args_parser() where it has one;
    else its main(argv) is entered with parse_args replaced by a capture, so it stops at the
    parse."""
    name = program[:-3].replace("/", ".") if program.endswith(".py") else program
    module = importlib.import_module(name)
    if hasattr(module, "__path__"):  # a package run with -m: its __main__
        module = importlib.import_module(name + ".__main__")
    for factory in ("get_parser", "build_parser", "get_args_parser"):
        if hasattr(module, factory):
            return getattr(module, factory)()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        module.main([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{program}: no argparse parser found")


def option_strings(parser):
    """Every option string of a parser, read from its help (argparse's public output): each
    line of the options' list starts with the invocations, '-v, --verbose' or '--task TASK'."""
    options = set()
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.update(part.split(" ")[0] for part in invocation.split(", "))
    return options


def unknown_flags(program, args):
    """The flags among `args` that `program`'s parser does not have."""
    options = option_strings(parser_of(program))
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-") and a not in ("-", "--")]
    return [f for f in flags if f not in options and not re.fullmatch(r"-\d.*", f)]


def source_text():
    texts = [open(os.path.join(ROOT, "Makefile")).read()]
    for stage in ("convert", "pretrain", "transfer", "results", "tools"):
        for path in glob.glob(os.path.join(ROOT, stage, "**", "*.py"), recursive=True):
            texts.append(open(path).read())
    return "\n".join(texts)


def check_command(tokens, makefile, sources):
    """Problems of one command, checked against the real Makefile, parsers and sources."""
    i = program_index(tokens)
    problems = [f"environment variable {ASSIGNMENT.match(t).group(1)} is read nowhere in the "
                "project" for t in tokens[:i] if ASSIGNMENT.match(t).group(1) not in sources]
    program, args = tokens[i], tokens[i + 1:]
    if program == "make":
        targets = [a for a in args if not ASSIGNMENT.match(a) and not a.startswith("-")]
        assignments = dict(ASSIGNMENT.match(a).groups() for a in args if ASSIGNMENT.match(a))
        for target in targets or ["help"]:
            if target not in makefile.recipes:
                problems.append(f"make target '{target}' is not in the Makefile")
                continue
            read = makefile.variables(target)
            problems += [f"make {target}: {var}= is not read by the target's recipe"
                         for var in assignments if var not in read]
            if "ARGS" in assignments and makefile.program(target):
                problems += [f"make {target} ARGS: {f} is not an option of "
                             f"{makefile.program(target)}"
                             for f in unknown_flags(makefile.program(target),
                                                    shlex.split(assignments["ARGS"]))]
        return problems
    if program == "torchrun":
        if "-m" not in args:
            return problems + ["torchrun without -m MODULE"]
        args = args[args.index("-m"):]
    if not args:
        return problems
    if args[0] == "-m":
        target, rest = args[1], args[2:]
    elif args[0].endswith(".py"):
        target, rest = args[0], args[1:]
    else:
        return problems + [f"{program}: neither -m MODULE nor a script"]
    if "--" in rest:
        rest = rest[:rest.index("--")]
    return problems + [f"{target}: {f} is not one of its options"
                       for f in unknown_flags(target, rest)]


def is_cheap(tokens):
    i = program_index(tokens)
    args = tokens[i + 1:]
    return "--help" in args or "-h" in args or "DRY_RUN=1" in args or \
        (tokens[i] == "make" and [a for a in args if not ASSIGNMENT.match(a)]
         in ([t] for t in CHEAP_TARGETS))


def broken_links(files):
    """Relative links of README.md and docs/ that do not resolve, and docs pages the README
    does not link."""
    problems, linked = [], set()
    for path in files:
        for target in LINK.findall(open(path).read()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(path),
                                                     target.split("#")[0]))
            if not os.path.exists(resolved):
                problems.append(f"{os.path.basename(path)}: link {target} does not resolve")
            elif path.endswith("README.md"):
                linked.add(resolved)
    problems += [f"docs/{os.path.basename(p)} is not linked from README.md" for p in files
                 if os.sep + "docs" + os.sep in p and os.path.normpath(p) not in linked]
    return problems


def all_commands(files):
    return [(os.path.relpath(p, ROOT), tokens) for p in files
            for tokens in fenced_commands(open(p).read())]


def run_cheap(tokens):
    """Run a cheap command with this interpreter's environment; (returncode, output tail)."""
    i = program_index(tokens)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(ASSIGNMENT.match(t).groups() for t in tokens[:i])
    program, args = tokens[i], tokens[i + 1:]
    if program == "make":
        venv = sys.prefix  # the environment running the tests; its setup stamp is not remade
        cmd = ["make", "-s", "-o", os.path.join(venv, ".setup-stamp"), f"VENV={venv}",
               f"PYTHON={sys.executable}", *args]
    else:
        cmd = [sys.executable, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return res.returncode, (res.stdout + res.stderr)[-2000:]


# `python -m X ...` / `python script.py ...` as python runs them (runpy, as __main__), one
# after the other in one interpreter: torch and detectron2 are imported once, not per command
RUN_IN_ONE_INTERPRETER = r"""
import contextlib, io, json, os, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    out, rc = io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:  # noqa: BLE001 (reported as the command's failure)
        rc = 1
        out.write(repr(e))
    results.append([rc, out.getvalue()[-2000:]])
print(json.dumps(results))
"""


def run_python_commands(commands):
    """[(returncode, output tail)] of python commands without environment assignments."""
    args = [tokens[program_index(tokens) + 1:] for tokens in commands]
    res = subprocess.run([sys.executable, "-c", RUN_IN_ONE_INTERPRETER, json.dumps(args)],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [tuple(r) for r in json.loads(res.stdout.splitlines()[-1])]


def run_all_cheap(commands):
    """{command: (returncode, output tail)}: the python ones in one interpreter, beside the
    others (make, or with environment assignments), two at a time."""
    plain = {c: t for c, t in commands.items()
             if program_index(t) == 0 and t[0] in PROGRAMS[1:4]}
    rest = {c: t for c, t in commands.items() if c not in plain}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batch = pool.submit(run_python_commands, list(plain.values())) if plain else None
        results = dict(zip(rest, pool.map(run_cheap, rest.values())))
        if batch is not None:
            results.update(zip(plain, batch.result()))
    return results


def test_docs_have_commands_and_every_one_matches_the_real_interfaces():
    files = doc_files()
    commands = all_commands(files)
    assert len(commands) >= 40 and len({p for p, _ in commands}) == len(files), \
        "every page shows what a user does"
    makefile, sources = Makefile(os.path.join(ROOT, "Makefile")), source_text()
    problems = [f"{path}: {' '.join(tokens)}: {problem}" for path, tokens in commands
                for problem in check_command(tokens, makefile, sources)]
    assert problems == []


def test_the_cheap_documented_commands_run():
    cheap = {" ".join(tokens): tokens for _, tokens in all_commands(doc_files())
             if is_cheap(tokens)}
    assert len(cheap) >= 8
    results = run_all_cheap(cheap)
    assert set(results) == set(cheap)
    failed = {cmd: out for cmd, (rc, out) in results.items() if rc != 0}
    assert failed == {}


def test_links_between_readme_and_docs_resolve():
    assert broken_links(doc_files()) == []


def test_control_misspelled_targets_variables_flags_and_links_are_found(tmp_path):
    """The same checks on a doc with one mistake per line: each is reported."""
    makefile, sources = Makefile(os.path.join(ROOT, "Makefile")), source_text()
    doc = "\n".join(["```",
                     "make transfr TASK=voc_frcnn_c4_24k",                   # target
                     "make transfer TSK=voc_frcnn_c4_24k",                   # variable
                     "make demo SEEDS=3",                                    # not read by demo
                     "python -m transfer.train_net --tsk voc_frcnn_c4_24k",  # flag
                     "python convert/to_detectron2.py in.pth --prefx e.",    # flag (no get_parser)
                     "make demo ARGS=\"--seed 3\"",                          # flag through ARGS
                     "DETECTRON_DATASETS=x make tasks",                      # environment
                     "make transfer TASK=voc_frcnn_c4_24k WEIGHTS=random SEED=1",  # correct
                     "```"])
    found = [check_command(t, makefile, sources) for t in fenced_commands(doc)]
    assert [len(p) for p in found] == [1, 1, 1, 1, 1, 1, 1, 0], found
    assert "transfr" in found[0][0] and "TSK=" in found[1][0] and "SEEDS=" in found[2][0]
    assert "--tsk" in found[3][0] and "--prefx" in found[4][0] and "--seed" in found[5][0]
    assert "DETECTRON_DATASETS" in found[6][0]
    # a cheap command that fails is seen to fail, run either way
    failing = {c: shlex.split(c) for c in ("make results DRY_RUN=1 ARGS=--no-such-flag",
                                           "python -m results --no-such-flag",
                                           "python convert/to_detectron2.py --no-such-flag")}
    assert {c: rc != 0 for c, (rc, _) in run_all_cheap(failing).items()} == \
        dict.fromkeys(failing, True)
    # links: a misspelled page and a page the README does not link
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[a](docs/a.md) [b](docs/bb.md)\n")
    (tmp_path / "docs" / "a.md").write_text("[back](../README.md)\n")
    (tmp_path / "docs" / "c.md").write_text("unlinked\n")
    assert broken_links(doc_files(str(tmp_path))) == [
        "README.md: link docs/bb.md does not resolve", "docs/c.md is not linked from README.md"]


@pytest.mark.parametrize("program", ["transfer.train_net", "convert/to_detectron2.py",
                                     "results", "tools.suite"])
def test_parsers_are_obtained_without_running_the_programs(program):
    parser = parser_of(program)
    assert isinstance(parser, argparse.ArgumentParser)
    options = option_strings(parser)
    assert {"-h", "--help"} <= options
    assert {"transfer.train_net": "--num-gpus", "convert/to_detectron2.py": "--prefix",
            "results": "--benchmarks", "tools.suite": "--slurm"}[program] in options
