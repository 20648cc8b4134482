"""Opening files beneath a model root without following a link out of it.

The daemon decides which directory a model name means; the worker opens the
files. Between the two, or after the operator configured an alias, a directory
under a root can be replaced by a symlink to anywhere. So the worker opens
every file it reads relative to the root with openat2(2) and
RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS: the kernel refuses any resolution
(a `..`, an absolute symlink, a /proc magic link) that leaves the root, with no
window between the check and the open. Where the kernel lacks openat2
(before Linux 5.6, or a seccomp filter refusing it: container runtimes older
than openat2 answer ENOSYS or EPERM, which a read-only open never gives
otherwise), the path is resolved with realpath and compared to the root
instead: that leaves a window in which a component swapped after realpath is
followed, except the last one (O_NOFOLLOW).

Stdlib only: the daemon and the worker share it.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the generic syscall table's number: x86-64 and aarch64 alike
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_EAGAIN_RETRIES = 8  # openat2 answers EAGAIN when a rename raced a `..` walk


class OutsideRoot(OSError):
    """The path resolves to somewhere outside the root."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_missing = False  # set once openat2 answered ENOSYS or EPERM
_OPENAT2_MISSING = (errno.ENOSYS, errno.EPERM)


def within(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies under it (both absolute, normalised)."""
    return os.path.commonpath([path, root]) == root


def open_beneath(root: str, relative: str, flags: int = os.O_RDONLY) -> int:
    """An fd for `relative` opened beneath the directory `root`; raises
    OutsideRoot when resolving it would leave `root` (an absolute `relative`
    included), or the OSError the open gave."""
    global _openat2_missing
    flags |= os.O_CLOEXEC
    if not _openat2_missing:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(root_fd, relative, flags)
        except OSError as exc:
            if exc.errno not in _OPENAT2_MISSING:
                raise
            _openat2_missing = True
        finally:
            os.close(root_fd)
    return _open_by_realpath(root, relative, flags)


def check_beneath(root: str, path: str) -> None:
    """Raise OutsideRoot unless `path` (absolute, or relative to `root`)
    resolves beneath `root`; OSError when it does not resolve at all."""
    relative = os.path.relpath(path, root) if os.path.isabs(path) else path
    os.close(open_beneath(root, relative, os.O_PATH))


def _openat2(root_fd: int, relative: str, flags: int) -> int:
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    name = os.fsencode(relative)
    for _ in range(_EAGAIN_RETRIES):
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(root_fd),
                           ctypes.c_char_p(name), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            break
    if code == errno.EXDEV:
        raise OutsideRoot(code, "resolves outside the model root", relative)
    raise OSError(code, os.strerror(code), relative)


def _open_by_realpath(root: str, relative: str, flags: int) -> int:
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if not within(real, real_root):
        raise OutsideRoot(errno.EXDEV, "resolves outside the model root", relative)
    return os.open(real, flags | os.O_NOFOLLOW)
