"""Atomic output files and early checks that an output location is writable."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence


def check_output_file(
    path: str | os.PathLike, *, inputs=(), own: Sequence[str] = (), force: bool = False
) -> str:
    """Fail early (one line) if `path` cannot or must not be written.

    The overwrite rule of every command that writes one file:

    - a missing or unwritable folder, or a folder at `path`, is an error;
    - `path` is never one of the command's `inputs` (the spec file, say);
    - a FIFO, device, socket or other non-regular file at `path` is never replaced;
    - an existing regular file is replaced only if it is an earlier output of the same
      kind (an `.npz` holding all the members named in `own`), or with `force`;
    - the replacement is atomic and happens only when the run succeeds (the caller
      decides what success is; see `jaxattn.cli.simulate`).

    Temporaries that a killed earlier writer left in the folder are removed.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("the output path is empty")
    _check_name_lengths(path)
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"output folder {parent} does not exist")
    if os.path.exists(path):
        for inp in inputs:
            if os.path.exists(inp) and os.path.samefile(path, inp):
                raise ValueError(
                    f"output {path} is the input file {inp}; refusing to "
                    "overwrite it (choose another --out)"
                )
        kind = _file_kind(os.stat(path).st_mode)
        if kind != "regular file":
            raise ValueError(
                f"output {path} is a {kind}, not a regular file; refusing to replace it"
            )
        if not force and not _holds_members(path, own):
            raise ValueError(
                f"output {path} exists and is not an earlier output of this "
                "command; pass --force to replace it"
            )
    _probe(parent)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"output file {path} is not writable")
    remove_stale_temporaries(parent)  # left by a writer killed mid-write
    return path


def _check_name_lengths(path: str) -> None:
    """A one-line error, before any work, for a path the file system cannot hold: a
    name longer than its NAME_MAX, or a whole path longer than its PATH_MAX (a long
    output name used to fail at the end, naming the temporary file instead)."""
    full = os.path.abspath(path)
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # pragma: no cover - a system without pathconf
        name_max, path_max = 255, 4096
    for name in full.split(os.sep):
        if len(os.fsencode(name)) > name_max:
            short = name if len(name) <= 40 else name[:20] + "…" + name[-10:]
            raise ValueError(
                f"output name {short} is {len(os.fsencode(name))} bytes long, over the "
                f"file system's limit of {name_max}"
            )
    if len(os.fsencode(full)) >= path_max:
        raise ValueError(
            f"output path is {len(os.fsencode(full))} bytes long, over the file "
            f"system's limit of {path_max - 1}"
        )


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"  # pragma: no cover


def _holds_members(path: str, members: Sequence[str]) -> bool:
    """True if `path` is an `.npz` archive with all of `members` (an earlier output)."""
    import zipfile

    if not members:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return all(f"{m}.npy" in names for m in members)


# Sizes above this are not spec files (a spec with explicit tokens for 10⁵ tokens in
# d = 64 is about 150 MB of text).
MAX_INPUT_BYTES = 256 * 2**20


def check_input_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The `stat` of an input that must be a regular file: a missing path, a folder, a
    FIFO or a device is refused with one line naming `what` and the path."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    kind = _file_kind(st.st_mode)
    if kind != "regular file":
        raise ValueError(f"{what} {path} is a {kind}, not a regular file")
    return st


def read_regular_file(
    path: str | os.PathLike, what: str, max_bytes: int = MAX_INPUT_BYTES
) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; FIFOs, devices and larger files
    are refused with one line (a FIFO would block forever, `/dev/zero` never ends)."""
    path = os.fspath(path)
    st = check_input_file(path, what)
    if st.st_size > max_bytes:
        raise ValueError(
            f"{what} {path} is {st.st_size} bytes, over the limit of {max_bytes} bytes"
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > max_bytes:  # grew while we read it
        raise ValueError(f"{what} {path} is over the limit of {max_bytes} bytes")
    return data


# ----------------------------------------------------------------- output locks
_HELD: dict[str, list] = {}


class OutputBusyError(ValueError):
    """Another process holds the output folder's lock."""


class OutputLockError(ValueError):
    """The lock file's path holds something that is not jaxattn's lock file."""


def _open_lock_file(path: str) -> int:
    """Open (creating) the lock file without following a link at its path, and refuse
    anything but a regular file with one name: the lock is truncated and rewritten, so
    a link to a user's file would overwrite that file."""
    refuse = f"{path} is not a jaxattn lock file ({{}}); remove it or choose another output folder"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise OutputLockError(refuse.format("a symbolic link")) from None
        raise OutputLockError(refuse.format(e.strerror or type(e).__name__)) from None
    info = os.fstat(fd)
    kind = _file_kind(info.st_mode)
    if kind == "regular file" and info.st_nlink == 1:
        return fd
    os.close(fd)
    if kind == "regular file":
        raise OutputLockError(refuse.format(f"a file with {info.st_nlink} hard links"))
    raise OutputLockError(refuse.format(f"a {kind}"))


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, name: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the duration of the block.

    The lock is `fcntl.flock` on `folder/.jaxattn-lock{name}`: the kernel drops it when
    the holder exits, even by SIGKILL, so a killed run never leaves a stale lock. A
    second writer gets `OutputBusyError` naming the holder (pid, host, start time,
    command). Re-entrant within one process. The lock file must be jaxattn's own: a
    regular file with one name. A symbolic link, a hard link to another file, a FIFO or a
    device at its path is refused (`OutputLockError`), never followed or truncated.
    """
    import fcntl
    import socket
    import sys
    import time

    path = os.path.join(os.fspath(folder), f".jaxattn-lock{name}")
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
        os.close(fd)
        raise OutputBusyError(
            f"{folder} is in use by another jaxattn run ({holder}); wait "
            "for it to finish or choose another output folder"
        ) from None
    info = (
        f"pid {os.getpid()} on {socket.gethostname()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}"
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the lock


def create_exclusive_json(path, data) -> bool:
    """Write `data` to `path` only if no file is there, atomically: the content is
    complete before the name appears (a temporary file hard-linked into place). Returns
    False, writing nothing, when `path` already exists (another writer won)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_clean(data), fh, indent=2, default=json_default, allow_nan=False)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _tmp_prefix() -> str:
    """Temporaries are named `.tmp-HOST-PID-…`, so a later run can tell a dead writer's
    leftovers from a live one's."""
    import socket

    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temporaries(folder: str) -> int:
    """Remove the `.tmp-*` files that a killed writer on this host left in `folder`
    (a SIGKILL between creating a temporary and renaming it into place). Files of live
    processes, and of other hosts sharing the folder, are left alone."""
    import socket

    host = socket.gethostname()
    n = 0
    for f in os.listdir(folder) if os.path.isdir(folder) else ():
        if not f.startswith(f".tmp-{host}-"):
            continue
        pid_text = f[len(f".tmp-{host}-") :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, f))
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's live process
        return True
    return True


def _probe(folder: str) -> None:
    """Create and remove a file in `folder` (permission bits lie for root)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=folder)
    except OSError as e:
        raise ValueError(f"output folder {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.remove(tmp)


def check_output_dir(path: str | os.PathLike, *, create: bool = True) -> str:
    """Fail early if `path` cannot hold outputs; create it (and parents) if asked."""
    path = os.fspath(path)
    if not path:
        raise ValueError("the output folder is empty")
    _check_name_lengths(os.path.join(path, "x" * 40))  # room for the files written in it
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output {path} exists and is not a folder")
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"cannot create output folder {path}: {parent} is not writable")
        if create:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create output folder {path}: {e.strerror}") from None
    if os.path.isdir(path):
        _probe(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the same folder; on success it replaces `path`
    atomically, on failure it is removed (no partial output is ever left)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=_tmp_prefix(), suffix=os.path.splitext(path)[1] or ".tmp", dir=folder
    )
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_atomic(path, writer: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_json(path, data) -> None:
    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(
                _clean(data), fh, indent=2, sort_keys=False, default=json_default, allow_nan=False
            )
            fh.write("\n")

    write_atomic(path, _w)


def write_text(path, text: str) -> None:
    """A UTF-8 text file, written atomically."""

    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_atomic(path, _w)


def write_npz(path, **arrays) -> None:
    """`np.savez`-compatible archive, written atomically and byte-for-byte reproducible:
    the same arrays give the same file (fixed member timestamps, no pickles)."""
    import zipfile

    import numpy as np

    def _w(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)

    write_atomic(path, _w)


def save_figure(fig, path, **kw) -> None:
    def _w(tmp):
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png", **kw)

    write_atomic(path, _w)


def json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__array__"):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """JSON has no NaN/inf: non-finite floats become null (documented where written)."""
    import math

    import numpy as np

    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
