#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the default test suite (slow suites excluded: run them with -m slow).
# Tests run in parallel processes (pytest-xdist: one per core, at most 4 — each holds jax, torch and peft, ~1.5 GB;
# JGOAT_TEST_WORKERS overrides, 0 runs them in this process), a module's tests on one worker (--dist loadscope: the
# 8-device subprocess fixtures of test_sharding & co. run once, not once per worker); the 25 slowest are listed at
# the end. Then the two-process `jgoat train` runs (slow-marked, ~5-8 min on 2 cores; JGOAT_MULTIHOST=0 skips them)
# and the google-tunix tests in their own locked environment (scripts/setup.sh --tunix; JGOAT_TUNIX=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -q -m "not slow" -n "${JGOAT_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadscope \
    --durations 25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
if [ "$rc" -ne 0 ] || [ "$#" -gt 0 ]; then exit "$rc"; fi
if [ "${JGOAT_MULTIHOST:-1}" != 0 ]; then
  .venv/bin/python -m pytest -q -p no:cacheprovider -m slow tests/test_cli_multihost.py
fi
if [ "${JGOAT_TUNIX:-1}" = 0 ]; then exit 0; fi
bash scripts/setup.sh --tunix
.venv-tunix/bin/python -m pytest -q -p no:cacheprovider tests/test_tunix.py
