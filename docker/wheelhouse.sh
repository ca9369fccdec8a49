#!/usr/bin/env bash
# Make the wheelhouses the images install from with `pip install --no-index` (no network in a build):
#   docker/wheelhouse.sh tasks     -> build/wheels/tasks    (requirements/tasks.txt, CPU torch included)
#   docker/wheelhouse.sh airflow   -> build/wheels/airflow  (requirements/orchestration.txt + the Postgres driver)
#   docker/wheelhouse.sh tasks-cuda -> build/wheels/tasks-cuda (CUDA 12.8 torch from the PyTorch index: needs it)
# `pip wheel` resolves the exact pins with this machine's pip configuration (index, CPU torch on local
# disk) and builds the few sdists into wheels here, so the image needs no compiler. The target is
# CPython 3.11 on glibc (both bases: python:3.11-slim-bookworm and the debootstrap base); a stamp of
# the inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
kind="${1:?usage: docker/wheelhouse.sh tasks|airflow|tasks-cuda}"
extra=()
case "$kind" in
    tasks) files=(requirements/tasks.txt) ;;
    airflow) files=(requirements/orchestration.txt docker/airflow-extra.txt) ;;
    tasks-cuda) files=(requirements/tasks.txt) extra=(torch==2.13.0+cu128)
        export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;;
    *) echo "unknown wheelhouse $kind" >&2; exit 2 ;;
esac
out="build/wheels/$kind"
stamp="$out/.inputs.sha256"
reqs=()
for f in "${files[@]}"; do reqs+=(-r "$f"); done
inputs=$(cat "${files[@]}" docker/wheelhouse.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
    echo "wheelhouse $out is up to date"
    exit 0
fi
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
start=$(date +%s)
# the machine-wide pip config may name index folders that do not exist: that noise is not news
"$PYTHON" -m pip wheel -q --wheel-dir "$out.tmp" "${reqs[@]}" "${extra[@]}" setuptools==84.2.1 2> >(grep -v "is ignored: it is neither" >&2)
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$inputs" >"$stamp"
echo "wheelhouse $out: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1), $(( $(date +%s) - start )) s"
