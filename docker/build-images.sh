#!/usr/bin/env bash
# `make images`: the wheelhouses, then the task image (CPU) and the Airflow image, with no network in
# the builds. BASE_IMAGE (default lm-pipeline-base:bookworm, made by docker/build-base.sh from the apt
# mirror) may be python:3.11.11-slim-bookworm where a registry is reachable. Prints build times and sizes.
#   docker/build-images.sh [tasks] [airflow] [tasks-cuda]     (default: tasks airflow)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE="${BASE_IMAGE:-lm-pipeline-base:bookworm}"
VERSION="${IMAGE_VERSION:-0.1.0}"
# a tree with uncommitted changes is not that commit: the label says so
GIT_SHA="${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . 2>/dev/null || echo -dirty)}"
# RUN --mount needs BuildKit: a client with the buildx plugin, or Debian's docker.io client (built in)
DOCKER="${DOCKER:-docker}"
if ! "$DOCKER" buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
export DOCKER DOCKER_BUILDKIT=1

"$DOCKER" info >/dev/null 2>&1 || { echo "no Docker engine answers (docker info failed)" >&2; exit 2; }
if [ "$BASE_IMAGE" = lm-pipeline-base:bookworm ]; then docker/build-base.sh "$BASE_IMAGE"; fi

pins() { grep -hvE '^\s*(#|$)' "$@" | xargs; }
build() {  # name dockerfile wheelhouse pins-files...
    local name=$1 dockerfile=$2 wheels=$3; shift 3
    docker/wheelhouse.sh "$wheels"
    local start; start=$(date +%s)
    "$DOCKER" build --network none -f "$dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg GIT_SHA="$GIT_SHA" --build-arg PINS="$(pins "$@")" \
        -t "$name:$VERSION" . >"build/$name.build.log" 2>&1 \
        || { tail -40 "build/$name.build.log" >&2; echo "build of $name failed (log: build/$name.build.log)" >&2; exit 1; }
    echo "$name:$VERSION built in $(( $(date +%s) - start )) s," \
        "$("$DOCKER" image inspect "$name:$VERSION" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
}

mkdir -p build
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tasks airflow)
for target in "${targets[@]}"; do
    case "$target" in
        tasks) build lm-pipeline-tasks docker/Dockerfile.tasks tasks requirements/tasks.txt ;;
        airflow) build lm-pipeline-airflow docker/Dockerfile.airflow airflow requirements/orchestration.txt docker/airflow-extra.txt ;;
        tasks-cuda) build lm-pipeline-tasks-cuda docker/Dockerfile.tasks-cuda tasks-cuda requirements/tasks.txt ;;
        *) echo "unknown image $target (tasks, airflow, tasks-cuda)" >&2; exit 2 ;;
    esac
done
