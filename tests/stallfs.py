"""A one-file FUSE file system whose reads hang until released: a real hung network mount, for tests.

It speaks the kernel's FUSE protocol over ``/dev/fuse`` directly (no libfuse), from a daemon thread of
the test process, and serves one regular file. While stalled, a READ is taken from the kernel and not
answered, so the reader blocks inside ``read(2)`` exactly as on a dead NFS or SMB server; ``release()``
answers the held reads and every later one with the file's bytes. Mounting needs root (``mount(2)``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from pathlib import Path

# opcodes of linux/fuse.h
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, INTERRUPT = 1, 2, 3, 14, 15, 18, 25, 26, 36
IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime (nsec x3) mode nlink uid gid rdev blksize flags
ROOT_NODE, FILE_NODE = 1, 2
MNT_DETACH = 2


class StalledMount:
    """``folder`` mounted with one file, ``name``, holding ``content``; reads hang until :meth:`release`."""

    def __init__(self, folder: Path, name: str, content: bytes):
        self.folder, self.path, self.content = folder, folder / name, content
        self._released = threading.Event()
        self._held: list[tuple[int, int, int]] = []  # (unique, offset, size) of unanswered reads
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self._fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}".encode()
        self._libc = ctypes.CDLL(None, use_errno=True)
        if self._libc.mount(b"stallfs", str(folder).encode(), b"fuse.stallfs", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"mounting FUSE at {folder}: {os.strerror(code)}")
        threading.Thread(target=self._serve, name="stallfs", daemon=True).start()

    def release(self) -> None:
        """Answer the held reads and every later one."""
        with self._lock:
            self._released.set()
            held, self._held = self._held, []
        for unique, offset, size in held:
            self._reply(unique, self.content[offset:offset + size])

    def unmount(self) -> None:
        self.release()
        self._libc.umount2(str(self.folder).encode(), MNT_DETACH)

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload)
        except OSError:  # the reader was interrupted (killed) meanwhile: the kernel dropped the request
            pass

    def _attr(self, node: int) -> bytes:
        mode, size = (0o40755, 0) if node == ROOT_NODE else (0o100644, len(self.content))
        return ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, 1, os.getuid(), os.getgid(), 0, 4096, 0)

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._fd, (1 << 20) + 4096)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted
            length, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size:length]
            if opcode == INIT:
                readahead = struct.unpack_from("<IIII", body)[2]
                # fuse_init_out of protocol 7.26: major, minor, max_readahead, flags, max_background,
                # congestion_threshold, max_write, time_gran, max_pages, padding, unused[8]
                self._reply(unique, struct.pack("<IIIIHHIIHH", 7, 26, readahead, 0, 16, 12, 4096, 1, 0, 0) + bytes(32))
            elif opcode == LOOKUP:
                if body.rstrip(b"\0").decode() == self.path.name:
                    self._reply(unique, struct.pack("<QQQQII", FILE_NODE, 0, 3600, 3600, 0, 0) + self._attr(FILE_NODE))
                else:
                    self._reply(unique, error=errno.ENOENT)
            elif opcode == GETATTR:
                self._reply(unique, struct.pack("<QII", 3600, 0, 0) + self._attr(node))
            elif opcode == OPEN:
                self._reply(unique, struct.pack("<QII", 0, 0, 0))
            elif opcode == READ:
                offset, size = struct.unpack_from("<QQI", body)[1:3]
                with self._lock:
                    if not self._released.is_set():
                        self._held.append((unique, offset, size))
                        continue
                self._reply(unique, self.content[offset:offset + size])
            elif opcode in (FORGET, INTERRUPT):
                pass  # no reply is expected; an interrupted read stays held, as on a hung server
            elif opcode in (RELEASE, FLUSH):
                self._reply(unique)
            else:
                self._reply(unique, error=errno.ENOSYS)
