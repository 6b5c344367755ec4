"""How many threads attnflow's CPU work runs on: one policy for every command, so that the intra-op threads
of torch, the DataLoader's decoding workers and the training loops of small probe heads do not fight over
the cores (an oversubscribed core spends its time switching and spin-waiting, not computing).

- A model's forward pass (extract, metrics) keeps torch's own setting (every core, unless the caller or
  ``OMP_NUM_THREADS`` chose otherwise), whatever ``--workers``:
  the thread count changes the order of floating-point sums, and a resumed or sharded run must give the
  same bits as one run whatever its worker count (torch already runs each decoding worker single-threaded).
- Training and evaluating small probe heads (probe, the demo's probes) uses :data:`SMALL_HEAD_THREADS`:
  their matrix products are too small for several threads to pay for their synchronisation, and on a busy
  machine the extra threads wait for cores instead (benchmarks/README.md has the measurements).
- ``--threads N`` (or the ``threads`` keyword) overrides the policy; so does ``OMP_NUM_THREADS`` when set,
  the convention every numerical library follows.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["SMALL_HEAD_THREADS", "available_cores", "policy_threads", "set_threads", "threads_for"]

SMALL_HEAD_THREADS = 1


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def policy_threads(work: str, workers: int = 0) -> int:
    """The intra-op threads the policy gives ``work``: ``"model"`` (a forward pass beside ``workers`` decoding
    processes) or ``"heads"`` (small probe heads)."""
    if work == "heads":
        return SMALL_HEAD_THREADS
    if work == "model":
        return torch.get_num_threads()  # torch's own setting: every core unless OMP_NUM_THREADS or a caller said otherwise
    raise ValueError(f"unknown kind of work '{work}'")


def set_threads(threads: int | None, work: str, workers: int = 0) -> int:
    """Set torch's intra-op threads for ``work``: ``threads`` when given, else ``OMP_NUM_THREADS`` when set,
    else :func:`policy_threads`. Returns the number set."""
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else policy_threads(work, workers)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads_for(threads: int | None, work: str, workers: int = 0):
    """:func:`set_threads` for the duration of a block, then torch's previous setting again: for library calls
    that run several kinds of work (the demo), which should not leave the caller's process changed."""
    previous = torch.get_num_threads()
    try:
        yield set_threads(threads, work, workers)
    finally:
        torch.set_num_threads(previous)
