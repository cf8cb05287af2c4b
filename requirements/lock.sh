#!/usr/bin/env bash
# Regenerate the hash-pinned locks from pyproject.toml (`make lock`; requirements/README.md).
# Resolves for Debian 12's interpreter, the one CI, the operator guide and the package use.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv-lock/bin/uv}
PY=${LOCK_PYTHON:-/usr/bin/python3}
compile() {
    "$UV" pip compile --quiet --python "$PY" --generate-hashes --no-strip-extras \
        --custom-compile-command "make lock" "$@"
}
extras=(--extra redis --extra uvloop)

# What the daemon runs on (the Debian package bundles exactly this).
compile pyproject.toml "${extras[@]}" -o requirements/runtime.txt
# Checks and tests: the runtime lock plus the tools and the build backend.
compile pyproject.toml requirements/build.in "${extras[@]}" --extra dev \
    -c requirements/runtime.txt -o requirements/dev.txt
# The lowest runtime versions pyproject.toml allows, the tools as in dev.txt: CI runs the
# unit and contract tests on it so that every lower bound is one that was tested.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
runtime_names=$(sed -n 's/^\([A-Za-z0-9._-]*\)\(\[[^]]*\]\)\?==.*/\1/p' requirements/runtime.txt)
sed -n 's/^\([A-Za-z0-9._-]*\)\(\[[^]]*\]\)\?==\([^ ]*\).*/\1==\3/p' requirements/dev.txt |
    while IFS='=' read -r name _ version; do
        grep -q -i -x -F "$name" <<<"$runtime_names" || echo "$name==$version"
    done >"$pins"
compile pyproject.toml requirements/build.in "${extras[@]}" --extra dev \
    --resolution lowest-direct -c "$pins" -o requirements/minimum.txt
# The locker itself.
compile requirements/lock-tools.in -o requirements/lock-tools.txt
# The build backend alone, installed first so that sdists (pyspf) and the project itself build
# with --no-build-isolation from pinned tools.
compile requirements/build.in -c requirements/dev.txt -o requirements/build.txt
