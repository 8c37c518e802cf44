#!/usr/bin/env bash
# Wheels for the device machine (docs/BENCH.md, "The first GPU session"): its image holds torch,
# torchvision, pyarrow, pandas, matplotlib, scikit-learn, tqdm and filelock, but not the lake's
# own libraries. Downloads, for its Python (3.12 unless PYVER says otherwise), the versions this
# checkout's .venv runs, into .whl/ (git-ignored; carried to the device with `carry: [".whl"]`).
# Needs the package registry, not the device. ~37 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
DEST="${DEST:-.whl}"
VENV_PY="${VENV_PY:-.venv/bin/python}"
# what the extraction, the store and the GPU bench import that the device image lacks (timm too:
# the image's version is unknown, and the adapters are tested against this one)
NAMES=(duckdb zarr numcodecs donfig submitit timm datasets dill multiprocess)
pinned() {  # NAME==VERSION as this checkout's venv has it
  "$VENV_PY" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}
mkdir -p "$DEST"
for name in "${NAMES[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "$(pinned "$name")"
done
du -sh "$DEST"
