"""Peak resident memory of this process, for the benchmarks."""
from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """The high-water mark of this process's resident memory, in MiB.

    Linux's ``VmHWM`` belongs to the process image, so a child started with fork and exec reports its own peak;
    ``ru_maxrss`` is carried across exec and would report the parent's resident size at the fork when that is
    larger. Elsewhere, ``ru_maxrss``, read as kilobytes (as Linux and the BSDs report it).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
