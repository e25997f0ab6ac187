# Sourced by interop/run.sh and integrations/test.sh: sets BIN (sessionguard)
# and DEV_BIN (sessionguard-dev, the emulator), building both (debug) unless
# SESSIONGUARD_BIN names them, then clears every SESSIONGUARD_* variable: the
# suites pass each setting as a flag, and one left in the caller's
# environment (a config file, --fail-on, an emulator topology) would change
# what they are checked against. Needs REPO_ROOT, `say` and `die`.

if [[ -n "${SESSIONGUARD_BIN:-}" ]]; then
  BIN="$SESSIONGUARD_BIN"
  DEV_BIN="${SESSIONGUARD_DEV_BIN:-$(dirname "$BIN")/sessionguard-dev}"
else
  say "== building sessionguard and sessionguard-dev"
  (cd "$REPO_ROOT" && cargo build --locked --quiet -p sessionguard -p sessionguard-dev)
  target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  BIN="$target_dir/debug/sessionguard"
  DEV_BIN="${SESSIONGUARD_DEV_BIN:-$target_dir/debug/sessionguard-dev}"
fi
[[ -x "$BIN" ]] || die "no sessionguard binary at $BIN"
[[ -x "$DEV_BIN" ]] || die "no sessionguard-dev binary at $DEV_BIN (cargo build -p sessionguard-dev)"
while read -r var; do
  unset "$var"
done < <(compgen -e | grep '^SESSIONGUARD_' || true)
