"""Atomic output files and early checks that an output location is writable."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator


def check_output_file(path: str | os.PathLike) -> str:
    """Fail early (one line) if `path` cannot be written: missing or unwritable folder."""
    path = os.fspath(path)
    if not path:
        raise ValueError("the output path is empty")
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"output folder {parent} does not exist")
    _probe(parent)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"output file {path} is not writable")
    return path


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".tmp",
                               dir=folder)
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
            json.dump(_clean(data), fh, indent=2, sort_keys=False, default=_json_default,
                      allow_nan=False)
            fh.write("\n")

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


def _json_default(o):
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
