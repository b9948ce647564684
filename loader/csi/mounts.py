"""The mount table and read-only bind mounts: the plugin's only contact with the kernel's mounts.

Mounts are made with mount(2) and umount2(2) through libc (ctypes), not the ``mount`` command: the flags are
exactly the ones named here (``MS_BIND``, then ``MS_REMOUNT|MS_BIND|MS_RDONLY|MS_NOSUID|MS_NODEV|MS_NOEXEC``: a
bind mount takes its read-only flag only from a remount), an error is an errno rather than text to parse, no
process is started per publish, and the agent image needs no util-linux. What is mounted is read back from
``/proc/self/mountinfo`` (parsed by the pure ``parse_mountinfo``), so the state survives an agent restart: it is
the kernel's.

The target is mounted by descriptor, not by path: its parent is opened from the kubelet pods directory one
component at a time without following symlinks (``open_beneath``), the target is made and opened in that parent, and
mount(2) gets ``/proc/self/fd/<fd>`` (as runc does). A component swapped for a symlink after the request was checked
cannot send the mount elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
READ_ONLY_FLAGS = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
UMOUNT_NOFOLLOW = 8
MOUNTINFO = "/proc/self/mountinfo"
_DIR_NOFOLLOW = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ESCAPE = re.compile(r"\\([0-7]{3})")


class MountError(OSError):
    """mount(2) or umount2(2) failed; ``errno`` is the kernel's."""


class NotBeneath(ValueError):
    """A path below the root has a symlink (or a '.', '..' or empty name) on the way; ``component`` names it."""

    def __init__(self, path: str, component: str) -> None:
        super().__init__(f"{path}: {component!r} is a symlink or not a plain name")
        self.path, self.component = path, component


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5)): the fields the plugin reads."""

    mount_point: str
    root: str  # the path inside its filesystem that is mounted here (a bind mount's source, for one on /)
    device: str  # major:minor
    options: frozenset[str]  # per-mount options: ro/rw, nosuid, nodev, noexec, ...
    fs_type: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Pure: the lines of /proc/<pid>/mountinfo, in order (a later mount at one path is on top of an earlier)."""
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        out.append(Mount(mount_point=_unescape(fields[4]), root=_unescape(fields[3]), device=fields[2],
                         options=frozenset(fields[5].split(",")), fs_type=fields[sep + 1] if sep + 1 < len(fields)
                         else ""))
    return out


def mount_at(path: str, table: list[Mount] | None = None) -> Mount | None:
    """The topmost mount whose mount point is exactly ``path`` (None: not a mount point)."""
    if table is None:
        with open(MOUNTINFO) as f:
            table = parse_mountinfo(f.read())
    found = None
    for m in table:
        if m.mount_point == path:
            found = m
    return found


def same_tree(path: str, source: str) -> bool:
    """Is the directory at ``path`` the very directory ``source`` (a bind mount of it shows the same inode)?"""
    try:
        a, b = os.stat(path), os.stat(source)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


def _fd_path(fd: int, name: str = "") -> str:
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


def _mount(source: str | None, target: str, flags: int, shown: str) -> None:
    src = os.fsencode(source) if source is not None else None
    if _c().mount(src, os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount({source!r}, {shown!r}, flags={flags:#x}): {os.strerror(err)}")


def _umount(target: str, flags: int, shown: str) -> bool:
    if _c().umount2(os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise MountError(err, f"umount({shown!r}): {os.strerror(err)}")


def bind_read_only(source: str, parent_fd: int, target: str) -> None:
    """Bind-mount the directory ``source`` at the directory named ``basename(target)`` in ``parent_fd`` (from
    ``open_beneath``; ``target`` is the whole path, for messages), then make that mount read-only, nosuid, nodev and
    noexec. The target is opened O_NOFOLLOW in the parent and mounted through /proc/self/fd, never looked up by
    path. Not recursive: nothing mounted under ``source`` comes along. A remount that fails takes the bind mount
    away again, so a writable view never stays."""
    name = os.path.basename(target)
    fd = os.open(name, _DIR_NOFOLLOW, dir_fd=parent_fd)
    try:
        _mount(source, _fd_path(fd), MS_BIND, target)
    finally:
        os.close(fd)
    try:
        top = os.open(name, _DIR_NOFOLLOW, dir_fd=parent_fd)  # now the root of the bind mount, which is on top
        try:
            _mount(None, _fd_path(top), READ_ONLY_FLAGS, target)  # a remount names the mount's own root
        finally:
            os.close(top)
    except OSError:
        _umount(_fd_path(parent_fd, name), UMOUNT_NOFOLLOW, target)
        raise


def unmount(target: str) -> bool:
    """umount2(target, 0): a plain unmount (EBUSY is an error, never a lazy detach). False when ``target`` was not
    a mount point (EINVAL) or does not exist."""
    return _umount(target, 0, target)


def resolves_under(path: str, root: str) -> bool:
    """Does ``path``'s parent directory, with every symlink resolved, still lie under ``root`` (resolved)? The
    target itself is created (or found as a directory, or a mount point) by the caller. A check by path, for a
    refusal before any work: the mount itself goes through ``open_beneath``."""
    parent = os.path.realpath(os.path.dirname(path))
    base = os.path.realpath(root)
    return parent == base or parent.startswith(base.rstrip("/") + "/")


def names_below(path: str, root: str) -> list[str]:
    """Pure: the names leading from ``root`` down to ``path`` ([] for ``root`` itself). NotBeneath when ``path`` is
    not ``root`` or under it, or a name is '.', '..' or empty (both must be absolute and normal)."""
    base = root.rstrip("/")
    if path in (root, base):
        return []
    if not path.startswith(base + "/"):
        raise NotBeneath(path, path)
    names = path[len(base) + 1:].split("/")
    for name in names:
        if name in ("", ".", ".."):
            raise NotBeneath(path, name)
    return names


def open_beneath(root: str, path: str) -> int:
    """An O_PATH descriptor of the directory ``path``: ``root`` is opened as it is (symlinks in it followed: the
    admin's configuration), then every name below it with O_NOFOLLOW, each in the directory opened before. What is
    opened is what was walked, whatever is renamed or swapped meanwhile. NotBeneath names a component that is a
    symlink; a missing one is FileNotFoundError, a file NotADirectoryError. The caller closes the descriptor."""
    names = names_below(path, root)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            try:
                below = os.open(name, _DIR_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(name, fd):
                    raise NotBeneath(path, name) from None
                raise
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
