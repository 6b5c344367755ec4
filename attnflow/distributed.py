"""Extraction over several processes and machines, as launched by ``torchrun``.

Each rank extracts one contiguous block of the image list into its own shard (``OUT.shards/rank-R-of-W.h5``
and, with ``--metrics``, ``METRICS.shards/...``), with everything a single-process run has: kill-safe
segments and ``--resume`` per shard. Rank 0 then writes ``OUT`` as one file the readers see as a whole: the
large per-image datasets are HDF5 virtual datasets over the shards (paths relative to ``OUT``'s folder, so
the two move together), the small ones are copied. Blocks are concatenated in rank order, so image order and
contents equal a single-process run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
import torch.distributed as dist

from .output import atomic_output
from .errors import AttnflowError
from .extract import extract
from .images import folder_classes
from .models import LoadedModel
from .options import ExtractOptions
from .store.assembly import in_memory_hdf5
from .store.names import FG, IMAGE_IDS, LABELS, SKIP_DATASETS, STATIC_DATASETS
from .store.scales import attach_dimension_scales
from .store.validate import file_attrs
from .store.write import inputs_digest

__all__ = [
    "SMALL_ROW_DATASETS", "Rank", "launched_rank", "init", "shard", "shard_path", "barrier", "finish",
    "extract_sharded", "assemble", "spawn_local",
]

# Row datasets that stay in the shards (virtual), the rest is copied: every row of these is at least 2-D.
SMALL_ROW_DATASETS = (IMAGE_IDS, LABELS, FG)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_rank() -> Rank | None:
    """The rank torchrun (or any env:// launcher) gave this process, or None for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Rank(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(rank: Rank, device: str) -> str:
    """Join the process group (NCCL for CUDA, gloo for the CPU); returns this rank's device."""
    cuda = device.startswith("cuda") or (device == "auto" and _cuda_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return f"cuda:{rank.local_rank}" if cuda else "cpu"


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def shard(items: Sequence[Any], rank: Rank) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of ``items`` that ``rank`` processes."""
    n = len(items)
    return n * rank.rank // rank.world, n * (rank.rank + 1) // rank.world


def shard_path(output: Path, rank: Rank, index: int | None = None) -> Path:
    r = rank.rank if index is None else index
    return output.with_name(output.name + ".shards") / f"rank-{r:03d}-of-{rank.world:03d}.h5"


def barrier() -> None:
    dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def extract_sharded(
    loaded: LoadedModel,
    paths: Sequence[Path],
    output: str | Path,
    options: ExtractOptions | None = None,
    *,
    metrics: str | Path | None = None,
    rank: Rank | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    **option_values: Any,
) -> Path | None:
    """One rank of a launch (``torchrun ... python my_script.py``): this rank's block of ``paths`` into its
    shard, then rank 0 writes ``output`` (and ``metrics``) over all shards. Returns ``output`` on rank 0,
    None on the others. Options as for :func:`attnflow.extract`; ``--resume`` keeps a finished
    shard only once it is checked to be this run's (inputs, model, options)."""
    options = (options or ExtractOptions()).replace(**option_values)
    rank = rank or launched_rank()
    if rank is None:
        raise AttnflowError("extract_sharded runs under torchrun (or another env:// launcher): WORLD_SIZE is not above 1")
    output = Path(output)
    metrics = None if metrics is None else Path(metrics)
    again = options.run.overwrite or options.run.resume  # a resumed run whose shards all check out assembles again
    for target in (output, metrics):
        if target is not None and target.exists() and not again:
            raise AttnflowError(f"{target} already exists; pass --overwrite to replace it")
    if len(paths) < rank.world:
        raise AttnflowError(f"{len(paths)} images for {rank.world} processes: launch at most {len(paths)}")
    device = init(rank, options.run.device)
    try:
        start, stop = shard(paths, rank)
        for target in (output, metrics):
            if target is not None:
                shard_path(target, rank).parent.mkdir(parents=True, exist_ok=True)
        extract(
            loaded, paths[start:stop], shard_path(output, rank), options.replace(device=device),
            metrics=None if metrics is None else shard_path(metrics, rank),
            class_names=folder_classes(paths) if options.inputs.labels_from_dirs else None, on_skip=on_skip,
            allow_empty=True,  # another shard may hold images; the whole is checked when assembled
        )
        barrier()
        if rank.leader:
            all_paths = [str(p) for p in paths]
            for target in (output, metrics):
                if target is not None:
                    shards = [shard_path(target, rank, i) for i in range(rank.world)]
                    assemble(target, shards, all_paths=all_paths, overwrite=again)
        barrier()
    finally:
        finish()
    return output if rank.leader else None


def assemble(output: Path, shards: list[Path], *, all_paths: Sequence[str], overwrite: bool) -> Path:
    """Write ``output`` over finished shard files: virtual datasets for the large rows, copies of the rest."""
    if output.exists() and not overwrite:
        raise AttnflowError(f"{output} already exists; pass --overwrite to replace it")
    image = _assemble(output, shards, all_paths)
    with atomic_output(output, reads=shards, resumable=True) as tmp:
        tmp.write_bytes(image)
    return output


def _assemble(output: Path, shards: list[Path], all_paths: Sequence[str]) -> bytes:
    """The assembled file's bytes: small (the shards hold the large rows), so it is built in memory."""
    handles = [h5py.File(p, "r") for p in shards]
    try:
        attrs = file_attrs(handles[0])
        counts = [int(h.attrs["n_images"]) for h in handles]
        n = sum(counts)
        if n == 0:
            raise AttnflowError(f"none of the {len(all_paths)} inputs could be decoded; no cache written")
        with in_memory_hdf5(libver=("v110", "latest")) as out:
            out.attrs.update(attrs)
            out.attrs.update({
                "n_images": n,
                "n_inputs": len(all_paths),
                "n_inputs_done": len(all_paths),
                "inputs_sha256": inputs_digest(list(all_paths)),
                "n_skipped": sum(int(h.attrs["n_skipped"]) for h in handles),
                "shards": [os.path.relpath(p, output.parent) for p in shards],
            })
            names: list[str] = []
            handles[0].visititems(  # the shards' dimension scales are made anew for the whole
                lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and not h5py.h5ds.is_scale(obj.id) else None
            )
            for name in names:
                first = handles[0][name]
                if name in STATIC_DATASETS:
                    out.create_dataset(name, data=first[()], dtype=first.dtype)
                elif name in SKIP_DATASETS:
                    out.create_dataset(name, data=np.concatenate([h[name][()] for h in handles]), dtype=first.dtype)
                elif name in SMALL_ROW_DATASETS or first.ndim < 3:
                    out.create_dataset(name, data=np.concatenate([h[name][()] for h in handles]), dtype=first.dtype,
                                       chunks=True, maxshape=(None, *first.shape[1:]))
                else:
                    layout = h5py.VirtualLayout(shape=(n, *first.shape[1:]), dtype=first.dtype)
                    start = 0
                    for path, h, count in zip(shards, handles, counts):
                        if count:
                            source = h5py.VirtualSource(os.path.relpath(path, output.parent), name, shape=h[name].shape)
                            layout[start:start + count] = source
                        start += count
                    out.create_virtual_dataset(name, layout)
            attach_dimension_scales(out)
    finally:
        for h in handles:
            h.close()
    return out.image



def spawn_local(nproc: int, argv: Sequence[str]) -> int:
    """``attnflow extract --nproc N``: run ``attnflow ARGV`` as N processes of one gloo (NCCL on GPUs) group on
    this machine, with the environment torchrun would give them (rank, world size, a free port on
    127.0.0.1). Their messages are relayed once each: an error every rank reports alike is one line, and the
    first process that fails stops the others (waiting at a barrier, they would wait forever). Returns the
    exit code: 0, or the first failing process's."""
    import signal
    import socket
    import subprocess
    import sys
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0"}
    lock, seen, failed, reported = threading.Lock(), set(), [], []

    def relay(proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            with lock:
                final = line.startswith(("attnflow: error:", "attnflow: interrupted", "attnflow: stopped"))
                if failed or line in seen or (final and reported):
                    continue  # one process's error is the run's; the others' reports of being stopped are noise
                seen.add(line)
                reported.extend([line] if final else [])
                sys.stderr.write(line)
                sys.stderr.flush()

    procs = [subprocess.Popen([sys.executable, "-m", "attnflow", *argv], stderr=subprocess.PIPE, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    relays = [threading.Thread(target=relay, args=(p,), daemon=True) for p in procs]
    for t in relays:
        t.start()
    code = 0
    try:
        running = list(enumerate(procs))
        while running:
            for rank, proc in list(running):
                status = proc.poll()
                if status is None:
                    continue
                running.remove((rank, proc))
                if status != 0 and not code:
                    relays[rank].join(timeout=5)  # its own line first
                    with lock:
                        failed.append(rank)
                    if status < 0:
                        name = signal.Signals(-status).name
                        sys.stderr.write(f"attnflow: error: process {rank} of {nproc} was killed ({name}); the others "
                                         "are stopped, and the run continues with --resume\n")
                    code = 1 if status < 0 else status
                    for _, other in running:
                        other.terminate()
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in relays:
            t.join(timeout=5)
    return code
