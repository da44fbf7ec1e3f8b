#!/usr/bin/env bash
# Build the wheel and sdist, install each into a fresh virtualenv (no editable install,
# no source tree on the path) and run `jaxattn demo --quick` from there; `pip check` must
# be clean. Used by CI (.ci/run); takes about a minute with a warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/build-env"
"$work/build-env/bin/pip" install --quiet build
"$work/build-env/bin/python" -m build --outdir "$work/dist" . > "$work/build.log"
for artefact in "$work"/dist/jaxattn-*.whl "$work"/dist/jaxattn-*.tar.gz; do
    env="$work/env-$(basename "$artefact" | tr -c 'a-zA-Z0-9\n' _)"
    "$PY" -m venv "$env"
    "$env/bin/pip" install --quiet "$artefact"
    "$env/bin/pip" check
    (cd "$work" && "$env/bin/jaxattn" demo --quick --out "$work/demo" > "$work/demo.log")
    test -s "$work/demo/summary.json"
    version=$(cd "$work" && "$env/bin/python" -c "import jaxattn; print(jaxattn.__version__)")
    echo "ok: $(basename "$artefact") installs, pip check is clean, jaxattn $version runs the demo"
    rm -rf "$work/demo"
done
