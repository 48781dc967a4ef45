#!/usr/bin/env bash
# A newcomer's install, timed: each in a fresh virtual environment with no pip cache, from the repository root.
#   1. the resolution alone of the test extra (pip install --dry-run), and whether pip backtracked
#   2. the README's first command: pip install -e . (the base install), then hdistill demo
#   3. the README's test install: pip install -e ".[test]" (the tests themselves: .ci/run)
# Usage: bash benchmarks/fresh_install.sh        (about 5 minutes on 2 cores; downloads what the registry serves)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_NO_CACHE_DIR=1

fresh() {   # fresh NAME: a new venv with an up-to-date pip, activated
    python3 -m venv "$work/$1"
    . "$work/$1/bin/activate"
    python -m pip install -q --upgrade pip
}

fresh resolve
start=$SECONDS
python -m pip install --dry-run --ignore-installed -e ".[test]" >"$work/resolve.log" 2>&1
resolved=$((SECONDS - start))
backtracked=$(grep -c "looking at multiple versions" "$work/resolve.log" || true)
echo "resolution of .[test] (dry run, no cache): ${resolved} s; backtracking notices: ${backtracked}"
deactivate

fresh base
start=$SECONDS
python -m pip install -q -e . >"$work/base.log" 2>&1
echo "pip install -e . (the demo's install): $((SECONDS - start)) s;" \
     "cloud or test packages in it: $(python -m pip list 2>/dev/null | grep -ciE '^(s3fs|moto|boto3|pytest) ' || true)"
start=$SECONDS
hdistill demo --out "$work/demo" >"$work/demo.log" 2>&1
echo "hdistill demo: $((SECONDS - start)) s"
deactivate

fresh test
start=$SECONDS
python -m pip install -q -e ".[test]" >"$work/test.log" 2>&1
echo "pip install -e \".[test]\": $((SECONDS - start)) s"
