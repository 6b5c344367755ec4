"""Assembly: a run's committed segments moved into one finished file, a step at a time, staged in memory and
committed through a redo state, so that a kill at any point resumes and a full disk is an ordinary error (see
:class:`Assembly`; the run folder it works in: :class:`attnflow.store.write.RowFileWriter`)."""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from ..errors import AttnflowError
from ..output import atomic_output, write_new_file
from .names import IMAGE_IDS, IMAGE_SHA256, LABELS, SKIP_DATASETS, TEXT

__all__ = ["Segment", "in_memory_hdf5", "ASSEMBLY", "ASSEMBLY_STATE", "STEP_BYTES", "Assembly"]


class Segment(NamedTuple):
    """One committed batch of a run: ``seg-<index>.h5`` in the run folder."""

    path: Path
    index: int
    n_images: int
    n_skipped: int
    n_inputs_start: int | None  # inputs done before this batch (None in segments written by attnflow 0.1)
    n_inputs_done: int


class in_memory_hdf5(contextlib.AbstractContextManager):
    """Build an HDF5 file in memory; once the block ends, ``.image`` holds its bytes.

    attnflow never lets HDF5 itself write to a disk that may fill up: a failed write inside HDF5 crashes
    the process (h5py issue 914) instead of raising. Bytes built here reach the disk through plain file
    I/O, whose failures are ordinary errors; the assembled output is staged in memory
    step by step (:class:`_StagedFile`).
    """

    def __init__(self, **kwargs: Any):
        self._file = h5py.File(f"attnflow-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False, **kwargs)
        self.attrs = self._file.attrs
        self.image = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __getitem__(self, name: str) -> Any:
        return self._file[name]

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._file.flush()
            self.image = self._file.id.get_file_image()
        self._file.close()


# -- assembly: the segments moved into one file, one step at a time -------------------------------------

ASSEMBLY = "assembly.h5"  # the file being assembled, in the run folder
ASSEMBLY_STATE = "assembly-state.h5"  # what the assembly holds, committed atomically after every step
STEP_BYTES = 1 << 20  # consecutive segments are moved together up to this size (one segment at least)


class _AssemblyState(NamedTuple):
    next: int  # the first segment not yet in the assembled file
    size: int  # the assembled file's committed length
    rows: int  # rows of the segments before ``next``
    skips: int  # skipped inputs of the segments before ``next``
    carry: dict[str, np.ndarray]  # rows after the last whole chunk of a multi-row-chunk dataset, not yet written
    pages: list[tuple[int, bytes]]  # the step's writes inside the previously committed length: (offset, bytes)


class _StagedFile:
    """A file object for h5py (its ``fileobj`` driver) over an assembled file whose first ``base`` bytes are
    committed: HDF5 reads them from disk, but everything it writes, there or beyond, stays in memory until
    :class:`Assembly` commits the step. Writes inside ``base`` are kept as 4 KiB pages (metadata: a few
    pages a step), writes beyond it as one tail (the step's new chunks)."""

    PAGE = 4096

    def __init__(self, fd: int, base: int):
        self._fd, self.base, self.size, self.pos = fd, base, base, 0
        self.pages: dict[int, bytearray] = {}
        self.tail = bytearray()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            start = index * self.PAGE
            page = self.pages[index] = bytearray(os.pread(self._fd, min(start + self.PAGE, self.base) - start, start))
        return page

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n, done = len(view), 0
        while done < n:
            at = self.pos + done
            if at < self.base:
                index = at // self.PAGE
                take = min(n - done, min((index + 1) * self.PAGE, self.base) - at)
                page = self.pages.get(index)
                if page is not None:
                    offset = at - index * self.PAGE
                    view[done:done + take] = page[offset:offset + take]
                else:  # read on through every page HDF5 has not written
                    stop = at + take
                    while stop < min(self.pos + n, self.base) and (stop // self.PAGE) not in self.pages:
                        stop = min((stop // self.PAGE + 1) * self.PAGE, self.pos + n, self.base)
                    take = stop - at
                    data = os.pread(self._fd, take, at)
                    view[done:done + len(data)] = data
                    view[done + len(data):done + take] = bytes(take - len(data))
            else:
                offset, take = at - self.base, n - done
                data = self.tail[offset:offset + take]
                view[done:done + len(data)] = data
                view[done + len(data):n] = bytes(take - len(data))
            done += take
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.pos) if n < 0 else n)
        self.readinto(buffer)
        return bytes(buffer)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n, done = len(view), 0
        while done < n and self.pos + done < self.base:
            at = self.pos + done
            index = at // self.PAGE
            take = min(n - done, min((index + 1) * self.PAGE, self.base) - at)
            offset = at - index * self.PAGE
            self._page(index)[offset:offset + take] = view[done:done + take]
            done += take
        if done < n:
            offset = self.pos + done - self.base
            if len(self.tail) < offset:
                self.tail.extend(bytes(offset - len(self.tail)))
            self.tail[offset:offset + n - done] = view[done:]
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        del self.tail[max(0, self.size - self.base):]
        return self.size

    def flush(self) -> None:
        pass

    def grown(self) -> bytes:
        """The bytes beyond ``base`` the file ends with."""
        return bytes(self.tail) + bytes(max(0, self.size - self.base - len(self.tail)))


class Assembly:
    """Moves a run's segments into ``<run folder>/assembly.h5``, deleting each once it is safely in, so the
    disk holds the segments and the assembled file together only one step at a time.

    HDF5 is not journalled, so it never writes the file in place: a step (a few consecutive segments) is
    staged in memory (:class:`_StagedFile`), then committed in an order that a kill at any point leaves
    resumable: (1) the new chunks are appended after the committed length and flushed; (2) ``assembly-state.h5``
    is committed atomically, holding the new length, the pages HDF5 rewrote inside the old length (its
    metadata: a redo log), the first segment not yet in, and the rows after the last whole chunk of each
    dataset chunked over several rows (written with the next step, so no chunk is ever rewritten); (3) the
    pages are written in place and the file cut to its length; (4) the step's segments are deleted. On
    resume the state's pages are written again (harmless when already there) and the file is cut to the
    committed length (dropping a step that was cut off). Only plain file I/O touches the disk, so a full disk
    is an ordinary error naming the bytes still needed.
    """

    def __init__(self, writer: Any):  # the RowFileWriter of the run (attnflow.store.write)
        self.writer = writer
        self.file = writer.partial / ASSEMBLY
        self.state_file = writer.partial / ASSEMBLY_STATE

    # -- the committed state ----------------------------------------------------------------------------
    def _save(self, state: _AssemblyState) -> None:
        records = [[s.index, s.n_images, s.n_skipped, s.n_inputs_start, s.n_inputs_done] for s in self.writer._segments]
        with in_memory_hdf5() as f:
            f.attrs.update({"next": state.next, "size": state.size, "rows": state.rows, "skips": state.skips,
                            "run_id": self.writer._run_id, "segments": json.dumps(records)})
            f.create_dataset("page_offsets", data=np.array([o for o, _ in state.pages], dtype=np.int64))
            f.create_dataset("page_bytes", data=np.frombuffer(b"".join(p for _, p in state.pages), dtype=np.uint8))
            f.create_dataset("page_lengths", data=np.array([len(p) for _, p in state.pages], dtype=np.int64))
            carry = f.create_group("carry")
            for i, (name, rows) in enumerate(state.carry.items()):  # names may hold "/" (metrics/...)
                carry.create_dataset(str(i), data=rows, dtype=TEXT if rows.dtype == object else rows.dtype).attrs["name"] = name
        with atomic_output(self.state_file, resumable=True) as tmp:
            tmp.write_bytes(f.image)

    @staticmethod
    def read_records(state_file: Path) -> tuple[str, int, list[list]]:
        """The run id, the first segment not yet assembled and every segment's record, as a state file holds them."""
        with h5py.File(state_file, "r") as f:
            return str(f.attrs["run_id"]), int(f.attrs["next"]), json.loads(f.attrs["segments"])

    def _load(self) -> _AssemblyState:
        with h5py.File(self.state_file, "r") as f:
            offsets, lengths, data = f["page_offsets"][()], f["page_lengths"][()], f["page_bytes"][()].tobytes()
            ends = np.cumsum(lengths)
            pages = [(int(o), data[e - k:e]) for o, k, e in zip(offsets, lengths, ends)]
            carry = {str(d.attrs["name"]): d[()] for d in f["carry"].values()}
            a = f.attrs
            return _AssemblyState(int(a["next"]), int(a["size"]), int(a["rows"]), int(a["skips"]), carry, pages)

    def _apply(self, fd: int, state: _AssemblyState) -> None:
        """Make the file on disk what ``state`` says: its pages in place, cut to its length, flushed."""
        for offset, page in state.pages:
            page = page[:max(0, state.size - offset)]
            if page:
                _pwrite_all(fd, page, offset)
        os.ftruncate(fd, state.size)
        os.fsync(fd)

    def open(self) -> _AssemblyState:
        """Start the assembled file (a skeleton), or continue the one a killed run left."""
        if self.state_file.exists() and self.file.exists():
            state = self._load()
            fd = os.open(self.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self._apply(fd, state)
            finally:
                os.close(fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()  # a skeleton whose first state was never committed
            skeleton = self.writer._skeleton()
            self._check_space(len(skeleton))
            write_new_file(self.file, skeleton)
            state = _AssemblyState(0, len(skeleton), 0, 0, {}, [])
            self._save(state)
        self._drop_assembled(state.next)
        return state

    def _drop_assembled(self, next_segment: int) -> None:
        for segment in self.writer._segments[:next_segment]:
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()

    def _check_space(self, needed: int) -> None:
        """Refuse, naming the bytes, a step the file system has no room for."""
        try:
            st = os.statvfs(self.writer.partial)
        except OSError:
            return
        if needed + (1 << 16) > st.f_bavail * st.f_frsize:
            raise self._no_space(needed)

    def _no_space(self, needed: int) -> AttnflowError:
        try:
            st = os.statvfs(self.writer.partial)
            free = f"{_size(st.f_bavail * st.f_frsize)} is free"
        except OSError:
            free = "the free space is unknown"
        return AttnflowError(
            f"no space left on device writing {self.file}: assembling {self.writer.path} needs {_size(needed)} free "
            f"for this step and {free} (the file grows by one step's segments while those already in are deleted); "
            "free space, then rerun with --resume"
        )

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, state: _AssemblyState) -> _AssemblyState:
        segments = self.writer._segments
        group, size = [], 0
        for segment in segments[state.next:]:
            segment_size = segment.path.stat().st_size
            if group and size + segment_size > STEP_BYTES:
                break
            group.append(segment)
            size += segment_size
        last = state.next + len(group) == len(segments)
        fd = os.open(self.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            staged = _StagedFile(fd, state.size)
            with h5py.File(staged, "r+", libver=("v110", "latest")) as out:
                carry = self._copy(out, group, state, last)
            grown = staged.grown()
            self._check_space(len(grown))
            try:
                _pwrite_all(fd, grown, state.size)
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, state.size)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._no_space(len(grown)) from None
                raise
            pages = [(index * _StagedFile.PAGE, bytes(page)) for index, page in sorted(staged.pages.items())]
            new = _AssemblyState(state.next + len(group), staged.size, state.rows + sum(s.n_images for s in group),
                                 state.skips + sum(s.n_skipped for s in group), carry, pages)
            self._save(new)  # from here on the step is in: a kill is repaired from the state
            self._apply(fd, new)
        finally:
            os.close(fd)
        self._drop_assembled(new.next)
        return new

    def _copy(self, out: h5py.File, group: list[Segment], state: _AssemblyState, last: bool) -> dict[str, np.ndarray]:
        """The group's rows into ``out``: one-row chunks as they are stored, the rest in whole chunks only."""
        carry: dict[str, np.ndarray] = {}
        handles = [h5py.File(s.path, "r") for s in group]
        try:
            names = [*self.writer._rows, IMAGE_IDS, *(n for n in (LABELS, IMAGE_SHA256) if n in out)]
            for name, counted, done in [*((n, "n_images", state.rows) for n in names),
                                        *((n, "n_skipped", state.skips) for n in SKIP_DATASETS)]:
                target = out[name]
                parts = [(h[name], getattr(s, counted)) for s, h in zip(group, handles) if getattr(s, counted)]
                c = target.chunks[0]
                if c == 1 and name not in SKIP_DATASETS:
                    row = done
                    for source, k in parts:
                        _copy_rows(source, target, row)
                        row += k
                    continue
                first = (done // c) * c  # the carried rows start at a chunk's first row
                pending = state.carry.get(name)
                data = [*([] if pending is None else [pending]), *(source[()] for source, _ in parts)]
                if not data:
                    continue
                rows = np.concatenate(data) if len(data) > 1 else data[0]
                end = first + len(rows)
                stop = end if last else (end // c) * c
                if stop > first:
                    target[first:stop] = rows[:stop - first]
                carry[name] = rows[stop - first:]
        finally:
            for h in handles:
                h.close()
        return carry


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB ({n:,} bytes)"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset``: a short write (a file size limit reached) continues, and then fails."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, start: int) -> None:
    """Rows of a segment into the assembled file; one-row compressed chunks are copied as stored bytes."""
    n = source.shape[0]
    same_filters = source.compression == target.compression and source.shuffle == target.shuffle
    if source.chunks and target.chunks and source.chunks[0] == target.chunks[0] == 1 and source.chunks == target.chunks and same_filters and source.compression:
        grid = [range(n)] + [range(0, d, c) for c, d in zip(source.chunks[1:], source.shape[1:])]
        for offset in itertools.product(*grid):
            mask, payload = source.id.read_direct_chunk(offset)
            target.id.write_direct_chunk((start + offset[0], *offset[1:]), payload, filter_mask=mask)
    else:
        target[start:start + n] = source[()]
