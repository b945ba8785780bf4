"""fdatasync that does not block the event loop: Linux native AIO (``io_submit`` with
``IOCB_CMD_FDSYNC``), its completion signalled on an eventfd the loop watches.

The kernel runs the sync on a worker of its own, so the loop thread neither waits in the
system call nor hands the sync to a Python thread (which would have to take the
interpreter lock back before it could say it is done). The sync is the same
``vfs_fsync(file, datasync=1)`` that ``os.fdatasync`` makes.

Contract: at most ``DEPTH`` syncs in flight; ``submit`` raises ``OSError`` if the kernel
refuses one (nothing is then in flight for it); ``reap`` returns the finished ones' tags
and results (0, or a negative errno as the system call would have failed). ``open_aio``
returns None where native AIO is not there (another OS or architecture, a kernel built
without it, a seccomp profile that refuses it): the caller syncs on its thread instead.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from typing import Final

DEPTH: Final = 4
_CMD_FDSYNC: Final = 3
_FLAG_RESFD: Final = 1
# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS: Final = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB: Final = struct.Struct("<QIIHhIQQqQII")  # struct iocb, 64 bytes
_EVENT: Final = struct.Struct("<QQqq")  # struct io_event, 32 bytes


class Aio:
    """One AIO context and the eventfd its completions are signalled on."""

    def __init__(self, syscalls: tuple[int, int, int, int]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setup, self._destroy, self._getevents, self._submit = syscalls
        self._context = ctypes.c_ulong(0)
        self._call(self._setup, ctypes.c_long(DEPTH), ctypes.byref(self._context))
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocb = ctypes.create_string_buffer(_IOCB.size)
        self._iocbs = (ctypes.c_void_p * 1)(ctypes.addressof(self._iocb))
        self._events = ctypes.create_string_buffer(_EVENT.size * DEPTH)
        self._no_wait = ctypes.create_string_buffer(16)  # struct timespec {0, 0}

    def _call(self, number: int, *args: object) -> int:
        result: int = self._syscall(ctypes.c_long(number), *args)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    def submit(self, fd: int, tag: int) -> None:
        """Start an fdatasync of ``fd``; ``reap`` gives ``tag`` back when it is done."""
        _IOCB.pack_into(
            self._iocb, 0, tag, 0, 0, _CMD_FDSYNC, 0, fd, 0, 0, 0, 0, _FLAG_RESFD, self.eventfd
        )
        self._call(self._submit, self._context, ctypes.c_long(1), self._iocbs)

    def reap(self) -> list[tuple[int, int]]:
        """The syncs finished since the last call: (tag, 0 or -errno), in no set order."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return []
        done = self._call(
            self._getevents,
            self._context,
            ctypes.c_long(0),
            ctypes.c_long(DEPTH),
            self._events,
            self._no_wait,
        )
        return [
            (tag, result)
            for tag, _, result, _ in (
                _EVENT.unpack_from(self._events, i * _EVENT.size) for i in range(done)
            )
        ]

    def close(self) -> None:
        """Drop the context (the kernel waits for syncs still in flight) and the eventfd."""
        if self.eventfd >= 0:
            self._syscall(ctypes.c_long(self._destroy), self._context)
            os.close(self.eventfd)
            self.eventfd = -1


def open_aio() -> Aio | None:
    """An AIO context, or None where this system has none to give."""
    syscalls = _SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or syscalls is None:
        return None
    try:
        return Aio(syscalls)
    except (OSError, AttributeError):
        return None
