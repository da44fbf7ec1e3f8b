"""MkDocs hooks for the documentation site (`make docs`).

The benchmark pages live in `benchmarks/` (linked into the site as `docs/benchmarks`)
and link the guides as `../docs/<page>.md`, which is right on a repository browser; in
the site the guides are one level up, so those links are rewritten to `../<page>.md`.
"""

from __future__ import annotations

import re

_DOCS_LINK = re.compile(r"\]\(\.\./docs/")


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.startswith("benchmarks/"):
        return _DOCS_LINK.sub("](../", markdown)
    return markdown
