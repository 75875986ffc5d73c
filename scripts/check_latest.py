"""Which upstream release breaks what: the test suite on the newest releases, each failure traced to one upgrade.

    python3 scripts/check_latest.py [PYTEST ARGS...]      (e.g. -m "not slow", or a test file)

1. `bash scripts/setup.sh --latest` builds .venv-latest with every package at its newest release (torch excepted).
2. The tests run there. If all pass, the lock can move forward (regenerate requirements/lock.txt from that venv).
3. Otherwise each package whose version differs from requirements/lock.txt is put back to its locked version, one at
   a time, and the failed tests rerun: the upgrades whose rollback makes a test pass are named beside that test.
   (A failure that no single rollback fixes is reported as such: it needs two upgrades together, or it is flaky.)

Not part of CI: it downloads whatever is newest, so its answer changes with the package index.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-latest" / "bin" / "python"
LOCK = ROOT / "requirements" / "lock.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def installed_versions() -> dict[str, str]:
    code = ("from importlib import metadata\n"
            "for d in metadata.distributions(): print(d.metadata['Name'], d.version)")
    out = subprocess.run([VENV_PY, "-c", code], check=True, capture_output=True, text=True).stdout
    return {canonical(n): v.split("+")[0] for n, v in (row.split() for row in out.splitlines())}


def failing_tests(args: list[str]) -> tuple[int, list[str]]:
    """Run pytest in .venv-latest; return its exit code and the node ids that failed or errored."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as report:
        rc = subprocess.run([VENV_PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *args],
                            cwd=ROOT, stdout=open(report.name, "w"), stderr=subprocess.STDOUT).returncode
        text = pathlib.Path(report.name).read_text()
    nodes = sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", text, re.M)})
    return rc, nodes


def pip_pin(name: str, version: str) -> None:
    subprocess.run([VENV_PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    f"{name}=={version}"], check=True, capture_output=True)


def main(argv: list[str]) -> int:
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--latest"], check=True)
    args = argv or ["-m", "not slow"]
    rc, failed = failing_tests(args)
    if rc == 0:
        print("every test passes on the newest releases: the lock can move forward")
        return 0
    if not failed:
        print(f"pytest exited {rc} without naming a failed test: read its output")
        return rc
    locked, now = locked_versions(), installed_versions()
    upgraded = sorted(n for n in now if n in locked and now[n] != locked[n] and n != "jgoat")
    print(f"{len(failed)} test(s) fail on the newest releases; {len(upgraded)} package(s) differ from the lock")
    culprits: dict[str, list[str]] = {node: [] for node in failed}
    for name in upgraded:
        pip_pin(name, locked[name])
        try:
            _, still = failing_tests(failed)
        finally:
            pip_pin(name, now[name])
        for node in failed:
            if node not in still:
                culprits[node].append(f"{name} {locked[name]} -> {now[name]}")
    for node, names in culprits.items():
        print(f"  {node}: " + (", ".join(names) if names else "no single rollback fixes it (two upgrades together?)"))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
