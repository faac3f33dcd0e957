"""What this machine is, read once in one place: the CPU's model name and features (from
/proc/cpuinfo) and the cores this process may use. Precision choices (pretrain/engine.py), the
process launcher's thread shares and every benchmark's header read it from here."""
import functools
import os
import platform


@functools.lru_cache(maxsize=None)
def cpu_info():
    """(model name, set of feature flags) of the first CPU; (platform.processor(), empty)
    where /proc/cpuinfo does not exist."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == (platform.processor() or
                                                             "unknown CPU"):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, frozenset(flags)


def cpu_name():
    return cpu_info()[0]


def cpu_has_fast_bf16():
    """True where the CPU has native bf16 matrix units (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def cpu_count():
    """The cores this process may run on (its affinity mask, as a scheduler sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
