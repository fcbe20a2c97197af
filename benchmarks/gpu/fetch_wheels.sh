#!/usr/bin/env bash
# Download the kit's pinned wheels (benchmarks/gpu/requirements.txt) for the GPU machine (x86-64 Linux, CPython 3.12)
# into .whl/ at the repository root, where run.sh finds them. Run where PyPI is reachable; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
mkdir -p .whl
grep -vE '^\s*(#|$)' benchmarks/gpu/requirements.txt | python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r /dev/stdin
# Exactly the pinned files, one version each: a stale second version would make pip refuse the whole install.
python3 - <<'PY'
import pathlib, re, sys
pins = {re.sub(r"[-_.]+", "_", line.split("==")[0].lower()): line.split("==")[1].strip()
        for line in pathlib.Path("benchmarks/gpu/requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")}
wheels = sorted(pathlib.Path(".whl").glob("*.whl"))
found = {}
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "_", name.lower())
    if pins.get(key) != version:
        print(f"removing {wheel.name}: not pinned in requirements.txt"); wheel.unlink(); continue
    found[key] = wheel
missing = sorted(set(pins) - set(found))
total = sum(w.stat().st_size for w in found.values()) / 2**20
print(f"{len(found)} wheels, {total:.1f} MiB in .whl/" + (f"; MISSING: {missing}" if missing else ""))
sys.exit(1 if missing or total > 58 else 0)  # the kit travels in 60 MiB with the repository
PY
