#!/usr/bin/env bash
# Builds attnd's two images from the top-level Dockerfile on a Debian 12 machine with nothing
# but apt (no image registry), and checks them as users run them.
#   scripts/image.sh               build attnd:cpu and attnd:cuda, then check both (the test)
#   scripts/image.sh build         build them only
#   scripts/image.sh extract DIR   build attnd:cuda and copy its attnd and attnctl, with the
#                                  shared libraries they load from the image, to DIR/bin and
#                                  DIR/lib, plus DIR/run (as shared/tools/device-bundle lays out)
# Installs docker.io and debootstrap if missing; uses the running dockerd, else starts its own
# (data in $ATTND_IMAGE_DIR, default build/image: a second run is warm) and stops it at the
# end; makes the base image with debootstrap; fetches the CUDA toolkit's wheels on the host
# into deploy/cuda/wheels (kept; pip inside a build container may not reach PyPI).
# ATTND_IMAGE_CLIENT=PATH: an attnctl built on this host, run on the host as the client.
set -eEuo pipefail
trap 'echo "image: failed: ${BASH_SOURCE[0]}:$LINENO: $BASH_COMMAND" >&2' ERR
if [ "$(id -u)" -ne 0 ]; then exec sudo -E "$0" "$@"; fi  # dockerd, debootstrap, setpriv
mode=${1:-test}
case $mode in
  test | build) ;;
  extract) [ $# -eq 2 ] || { echo "usage: image.sh extract DIR" >&2; exit 2; }
           out=$(realpath -m "$2") ;;
  *) echo "usage: image.sh [test|build|extract DIR]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

scripts/setup.sh image
# Debian's CLI: it speaks BuildKit by itself (a newer CLI wants the buildx plugin for that).
docker() { "${ATTND_DOCKER:-/usr/bin/docker}" "$@"; }
export DOCKER_BUILDKIT=1
state=${ATTND_IMAGE_DIR:-${ATTND_BUILD_DIR:-build}/image}
mkdir -p "$state"
state=$(cd "$state" && pwd)
base=attnd-base:bookworm

# shellcheck source=scripts/image/daemon.sh
. scripts/image/daemon.sh
# shellcheck source=scripts/image/checks.sh
. scripts/image/checks.sh
# One run at a time per state folder: two dockerds cannot share one data root.
exec 9>"$state/lock"
flock 9
trap 'checks_cleanup; docker_down' EXIT
docker_up "$state"

timed() {  # timed LABEL COMMAND...: runs it, logging how long it took
  local start=$SECONDS
  "${@:2}"
  echo "image: $1 took $((SECONDS - start)) s" >&2
}

# The wheels of deploy/cuda/requirements.txt, once: pip on the host, in a venv if need be.
cuda_wheels() {
  local dir=deploy/cuda/wheels pip=(python3 -m pip)
  if [ -f "$dir/.complete" ] && [ "$dir/.complete" -nt deploy/cuda/requirements.txt ]; then return; fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    [ -x "$state/venv/bin/pip" ] || python3 -m venv "$state/venv"
    pip=("$state/venv/bin/pip")
  fi
  rm -f "$dir"/*.whl
  "${pip[@]}" download -q --disable-pip-version-check --no-deps -d "$dir" \
    -r deploy/cuda/requirements.txt
  touch "$dir/.complete"
}

build() {  # build TARGET: attnd:TARGET, from the Dockerfile's stage TARGET
  local log=$state/build-$1.log
  if ! docker build --progress=plain --network host --target "$1" -t "attnd:$1" \
      --build-arg BUILD_IMAGE="$base" --build-arg RUNTIME_IMAGE="$base" . >"$log" 2>&1; then
    tail -40 "$log" >&2
    return 1
  fi
  echo "image: attnd:$1 is $(docker image inspect -f '{{.Size}}' "attnd:$1" |
    awk '{printf "%.0f MB", $1 / 1e6}') (build log: $log)" >&2
}

timed "base image" base_image "$base"
timed "CUDA wheels" cuda_wheels
if [ "$mode" != extract ]; then timed "attnd:cpu build" build cpu; fi
timed "attnd:cuda build" build cuda
if [ -n "$dockerd_pid" ]; then
  # Our own daemon only: what older builds left (the images they tagged, layers and ccache
  # past a few GB) goes, so that build/image does not grow with every source change.
  docker image prune -f >/dev/null
  docker builder prune -f --keep-storage=4gb >/dev/null
fi

case $mode in
  test)
    timed "attnd:cpu check" check_cpu attnd:cpu
    timed "attnd:cuda check" check_cuda attnd:cuda
    echo "image: PASS" >&2 ;;
  extract)
    mkdir -p "$out/bin" "$out/lib"
    c=$(docker create attnd:cuda)
    check_containers+=("$c")
    docker cp "$c:/usr/local/bin/attnd" "$out/bin/attnd"
    docker cp "$c:/usr/local/bin/attnctl" "$out/bin/attnctl"
    # What the binaries load from the image, less glibc and the driver (the host's own).
    docker run --rm --entrypoint sh attnd:cuda -c 'ldd /usr/local/bin/attnd /usr/local/bin/attnctl' |
      awk '/=> \//{print $3}' | sort -u |
      grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|libutil|libcuda)\.so|ld-linux' |
      while read -r lib; do docker cp -L "$c:$lib" "$out/lib/"; done
    cat >"$out/run" <<'RUN'
#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
exe=$1; shift
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/$exe" "$@"
RUN
    chmod +x "$out/run"
    echo "image: attnd:cuda's attnd and attnctl, $(ls "$out/lib" | wc -l) libraries in $out" >&2 ;;
esac
