"""Process-wide settings of an entry point, given as its flags and applied by its main.

Importing this project's packages changes nothing in the process: the settings that concern the
whole process are options of the programs (``python -m transfer.train_net``, ``pretrain.*``,
``tools.demo``, ``tools.suite``, the benchmarks), and the programs that start other programs
pass them on the command line.

- ``--omp-wait-policy passive|active|default``: how OpenMP's idle threads wait. torch's OpenMP
  (libgomp) reads ``OMP_WAIT_POLICY`` once, when torch loads it, so a program whose
  environment does not already say the policy asked for starts itself again with it (one
  ``execve``, same process id, before any work). passive, the default, makes threads that
  finish an op early sleep instead of spinning: on a small CPU shared with data workers or a
  second run, spinning threads turn every parallel op into a wait for a descheduled thread
  (measured 8.5 s against 0.7 s per demo iteration, BENCHMARKS.md). default leaves libgomp's
  own policy (spin for a while, then sleep).
- ``program(main, parser)``: what a program's ``if __name__ == "__main__"`` block calls:
  parses the command line, applies the settings (which may start the program again) and runs
  ``entry_point(main, args)``; ``entry_point`` prints a user's mistake (``UserError``) as one
  line, and is what a caller that is not a fresh program (a test, another program) runs.
"""
import os
import sys

from convert.errors import UserError

OMP_WAIT_POLICIES = ("passive", "active", "default")


def add_process_flags(parser):
    parser.add_argument("--omp-wait-policy", choices=OMP_WAIT_POLICIES, default="passive",
                        help="how OpenMP's idle threads wait: passive (sleep; the default), "
                             "active (spin) or default (libgomp's own); applied by starting the "
                             "program again with OMP_WAIT_POLICY set when it is not")
    return parser


def omp_environment(policy, environ):
    """`environ` with OMP_WAIT_POLICY as `policy` asks (without it for 'default')."""
    env = {k: v for k, v in environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def apply_omp_wait_policy(policy):
    """Start this program again with the policy in its environment, unless it is there."""
    env = omp_environment(policy, os.environ)
    if env.get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def entry_point(main, args):
    """``main(args)``; a UserError exits with ``error: <message>`` on stderr (status 1)."""
    try:
        return main(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def program(main, parser, argv=None):
    """A program's start (its ``__main__`` block only): parse, apply the process-wide
    settings (``add_process_flags``; this may start the program again), run."""
    args = parser.parse_args(argv)
    apply_omp_wait_policy(args.omp_wait_policy)
    return entry_point(main, args)
