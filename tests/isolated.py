"""Run a load in a forked worker: a segfault, a stall or a memory blow-up is an outcome the
test reports, not the end of the test process.

``isolated(fn, seconds, megabytes)`` runs ``fn()`` in a forked child whose address space is
capped (its size at the fork plus 2 x `megabytes`, so that a broken loader cannot take the
machine's memory) and returns an ``Outcome``: what it returned or raised, how it ended (a
signal, a timeout), its wall time and the growth of its peak resident memory (VmHWM, reset at
the start) in MB; ``in_process`` measures a call in this process alike. ``run_cases`` runs
many cases in a few forked workers, one case at a time, and attributes a crash or a stall to
the case in flight, then goes on with a fresh worker.
"""
import faulthandler
import json
import os
import resource
import select
import signal
import sys
import time
from dataclasses import dataclass


@dataclass
class Outcome:
    ended: str  # "returned", "raised", "crashed" (signal), "timeout"
    value: object = None  # what fn returned (JSON), or "Type: message" of what it raised
    seconds: float = 0.0
    megabytes: float = 0.0

    def message(self):
        return self.value if self.ended == "raised" else None


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child_setup(megabytes):
    faulthandler.disable()  # a crash is the outcome reported, not a traceback dump
    torch = sys.modules.get("torch")
    if torch is not None:  # one thread: the worker shares the machine
        torch.set_num_threads(1)
    cap = _status_kb("VmSize") * 1024 + 2 * megabytes * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS from here on
        f.write("5")


def _call(fn):
    _reset_peak()
    start, rss = time.perf_counter(), _status_kb("VmRSS")
    try:
        ended, value = "returned", fn()
    except SystemExit as e:  # an entry point's one line (or its status)
        ended, value = "raised", str(e.code)
    except BaseException as e:  # noqa: BLE001 -- any way the load ends is the outcome
        ended, value = "raised", f"{type(e).__name__}: {e}"
    return {"ended": ended, "value": value, "seconds": time.perf_counter() - start,
            "megabytes": (_status_kb("VmHWM") - rss) / 1024}


def in_process(fn):
    """The Outcome of fn() in this process (for entry points whose worker threads a fork
    would deadlock: OpenMP after fork), its peak memory growth measured the same way."""
    return Outcome(**_call(fn))


def isolated(fn, seconds, megabytes):
    """The Outcome of fn() in a forked child, stopped after `seconds` x 3 at most."""
    [(_, outcome)] = run_cases(lambda i: fn(), [0], seconds * 3, megabytes, workers=1)
    return outcome


def _worker(fn, cases, write_fd, megabytes):
    try:
        _child_setup(megabytes)
        with os.fdopen(write_fd, "w", buffering=1) as out:
            for case in cases:
                out.write(json.dumps(_call(lambda: fn(case)), default=str) + "\n")
    finally:
        os._exit(0)


def run_cases(fn, cases, seconds, megabytes, workers=2):
    """[(case, Outcome)] of fn(case) for every case, in forked workers; a case running
    longer than `seconds` is stopped and reported as a timeout."""
    pending = [list(cases[i::workers]) for i in range(workers)]
    results, running = [], {}

    def start(todo):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _worker(fn, todo, write_fd, megabytes)
        os.close(write_fd)
        running[read_fd] = [pid, todo, b"", time.monotonic()]

    for todo in pending:
        if todo:
            start(todo)
    while running:
        ready, _, _ = select.select(list(running), [], [], 0.5)
        for fd in list(running):
            pid, todo, buf, since = running[fd]
            if fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        results.append((todo[0], Outcome(**json.loads(line))))
                        todo = todo[1:]
                        since = time.monotonic()
                    running[fd] = [pid, todo, buf, since]
                    continue
            stalled = time.monotonic() - since > seconds
            if fd not in ready and not stalled:
                continue
            # the worker ended (EOF) or stalls: the case in flight, if any, is its outcome
            if stalled:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(fd)
            del running[fd]
            if todo:
                ended = "timeout" if stalled else "crashed"
                value = None if stalled else signal.Signals(os.WTERMSIG(status)).name \
                    if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
                results.append((todo[0], Outcome(ended, value, time.monotonic() - since)))
                if todo[1:]:
                    start(todo[1:])
    return results
