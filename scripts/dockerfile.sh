#!/usr/bin/env bash
# Checks a Dockerfile (default: the repository's): hadolint with the
# repository's .hadolint.yaml (any finding fails), then the project's own
# checks (scripts/dockerfile_checks.py: the release build of the shipped
# package, every path cargo needs copied, the runtime stage running the built
# binary with its config, ports and health check). Both always run; the exit
# status is non-zero if either found anything.
#
# The tools (scripts/dockerfile-requirements.txt) are installed from PyPI the
# first time into .tools/dockerfile (a virtualenv, or `pip install --target`
# where the venv module is missing), and again when that file changes; a lock
# lets concurrent runs (the Rust tests in crates/sessionguard/tests/it/
# dockerfile.rs) install once.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DOCKERFILE="$(realpath "${1:-$ROOT/Dockerfile}")"
TOOLS="$ROOT/.tools/dockerfile"
REQUIREMENTS="$ROOT/scripts/dockerfile-requirements.txt"

mkdir -p "$ROOT/.tools"
exec 9>"$ROOT/.tools/dockerfile.lock"
flock 9
wanted="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ "$(cat "$TOOLS/.requirements-hash" 2>/dev/null || true)" != "$wanted" ]]; then
  echo "== pip install -r scripts/dockerfile-requirements.txt (.tools/dockerfile)" >&2
  rm -rf "$TOOLS"
  if python3 -m venv "$TOOLS" >/dev/null 2>&1; then
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" >&2
  else
    rm -rf "$TOOLS"
    mkdir -p "$TOOLS/site"
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/site" \
      -r "$REQUIREMENTS" >&2
  fi
  printf '%s\n' "$wanted" >"$TOOLS/.requirements-hash"
fi
flock -u 9

if [[ -x "$TOOLS/bin/python" ]]; then
  HADOLINT="$TOOLS/bin/hadolint"
  PYTHON=("$TOOLS/bin/python")
else
  HADOLINT="$TOOLS/site/bin/hadolint"
  PYTHON=(env "PYTHONPATH=$TOOLS/site" python3)
fi

status=0
"$HADOLINT" --no-color --config "$ROOT/.hadolint.yaml" "$DOCKERFILE" || status=1
"${PYTHON[@]}" "$ROOT/scripts/dockerfile_checks.py" "$DOCKERFILE" || status=1
exit "$status"
