#!/usr/bin/env bash
# Check the dependency floors: install the minimum version of every dependency that pyproject.toml
# declares (each `name>=X` becomes `name==X`) into a fresh virtual environment, then run the fast tests.
#
#   tests/min_versions.sh                      # the floors as declared, in /tmp/glow-min-versions
#   tests/min_versions.sh torch==2.5.1         # try another candidate (replaces that package's pin)
#   PYTHON=python3.10 VENV=/tmp/v tests/min_versions.sh
#   TESTS="tests/test_layers.py" tests/min_versions.sh
#
# PyPI's Linux torch wheels are CUDA builds: each torch version pulls ~3 GB of nvidia-* wheels (the
# script prints the free disk space first). The tests run on the CPU either way. Exit code: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.10}  # the oldest Python that requires-python admits (pyenv: PYTHON=~/.pyenv/versions/3.10.13/bin/python)
VENV=${VENV:-${TMPDIR:-/tmp}/glow-min-versions}
# the whole suite (~3 min; tests of optional extras that are not installed here skip): a subset once missed that
# torch 2.6's compiler broke the graph in the flow's float32 wrapper and that jsonargparse 4.39 words errors otherwise
TESTS=${TESTS:-tests}

echo "== disk: $(df -h --output=avail "$(dirname "$VENV")" | tail -1 | tr -d ' ') free where the venv goes ($VENV)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# The floors, read from pyproject.toml; extras ([signatures]) are kept; command-line pins replace them.
mapfile -t PINS < <("$PY" - "$@" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import pip._vendor.tomli as tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
overrides = {re.split(r"[\[=<>!~]", arg)[0].lower(): arg for arg in sys.argv[1:]}
for dep in deps:
    name = re.split(r"[\[=<>!~ ;]", dep)[0]
    floor = re.search(r">=\s*([\w.]+)", dep)
    if name.lower() in overrides:
        print(overrides.pop(name.lower()))
    elif floor:
        extras = re.match(r"[\w.-]+(\[[^\]]*\])?", dep).group(1) or ""
        print(f"{name}{extras}=={floor.group(1)}")
    else:
        print(dep)
print(*overrides.values(), sep="\n")
EOF
)
echo "== installing: ${PINS[*]}"
start=$(date +%s)
"$PY" -m pip install --quiet --only-binary :all: "${PINS[@]}" pytest scipy
"$PY" -m pip install --quiet --no-deps --no-build-isolation . 2>/dev/null || "$PY" -m pip install --quiet --no-deps .
echo "== installed in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|lightning|torchmetrics|jsonargparse|numpy|pillow|tensorboard|wandb|fsspec|matplotlib|typing.extensions|scipy) "

start=$(date +%s)
set +e
# shellcheck disable=SC2086  # TESTS is a list
WANDB_MODE=offline "$PY" -m pytest -q -p no:cacheprovider $TESTS
rc=$?
echo "== tests: exit code $rc in $(( $(date +%s) - start )) s"
exit $rc
