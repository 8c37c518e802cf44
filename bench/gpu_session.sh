#!/usr/bin/env bash
# The one command for a session's device machine (docs/BENCH.md, "The first GPU session"):
# installs the carried wheels (bench/gpu_wheels.sh) and this checkout into /tmp/site, then runs
# bench/gpu_first_session.py; its summary, the bench's results and the log land in $OUT, which
# the device tool brings back (a few files, two folders deep at most: the session's lakes stay
# in /tmp). Extra arguments go to gpu_first_session.py (e.g. --quick, --steps bench).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/site}"
OUT="${OUT:?set OUT: the folder whose files come back}"
WORK="${WORK:-/tmp/gpu-session}"
export PYTHONUNBUFFERED=1
if [ -d "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  # tokenlake itself (its folders install as tokenlake.*: pyproject.toml), without dependencies
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --upgrade --target "$SITE" .
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as m, importlib.util, platform
print("tokenlake from", importlib.util.find_spec("tokenlake.extract").origin)
names = ["torch", "torchvision", "timm", "duckdb", "pyarrow", "zarr", "numpy", "tokenlake"]
print("python", platform.python_version())
for n in names:
    try:
        print(n, m.version(n))
    except m.PackageNotFoundError:
        print(n, "MISSING")
PY
status=0
"$PYTHON" bench/gpu_first_session.py --out "$WORK" --results "$OUT/bench-results-gpu.json" \
  --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/session-log.txt" || status=$?
cp "$WORK/session.json" "$OUT/" 2>/dev/null || true
exit "$status"
