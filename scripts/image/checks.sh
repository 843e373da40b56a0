# shellcheck shell=bash
# Sourced by scripts/image.sh: each image checked as users run it. attnd listens on a Unix
# socket in a host folder mounted at /run/attnd and shares the host's IPC namespace, so a client
# on the host reaches it and shares /dev/shm with it. Host networking: /metrics and TCP are on
# 127.0.0.1 here, and our dockerd needs no bridge.
#
# The client: $ATTND_IMAGE_CLIENT (an attnctl built on this host; the test command passes its
# own) run on the host, else the image's attnctl in a second container sharing the same socket
# folder and IPC namespace.
#
# image.sh runs under pipefail, so a producer piped into grep must not meet `grep -q`: grep
# would stop at the first match and the producer's next write (docker logs writes stdout and
# stderr apart) fail with SIGPIPE, failing a check that matched (the likely cause of one CI
# failure: "no fallback to the CPU backend" right after the container reported healthy).

check_work=""
check_containers=()

# A free port below the ephemeral range (32768+): a port the kernel hands out for bind(0) could
# be handed again, before attnd binds it, to a test running beside this one (UCX's tcp
# listeners and connections in the KV transfer tests take ephemeral ports by the dozen).
free_port() {
  python3 -c '
import random, socket
for _ in range(500):
    port = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print(port)
        break
    except OSError:
        pass
    finally:
        s.close()'
}

# Whether /metrics on PORT shows LINE (a regular expression), within 10 s.
metrics_show() {
  local port=$1 line=$2
  for _ in $(seq 1 20); do
    if curl -sf "http://127.0.0.1:$port/metrics" | grep "$line" >/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "image: /metrics on port $port never showed $line" >&2
  return 1
}

# attnctl as UID:GID: client UID:GID IMAGE WHERE ARGS..., WHERE being unix:SOCKDIR (the host
# folder of the socket) or tcp:PORT (on 127.0.0.1).
client() {
  local user=$1 image=$2 where=$3 host_target inside_target mount=()
  shift 3
  case $where in
    unix:*)
      host_target="unix://${where#unix:}/attnd.sock"
      inside_target=unix:///run/attnd/attnd.sock
      mount=(-v "${where#unix:}:/run/attnd") ;;
    tcp:*) host_target="127.0.0.1:${where#tcp:}" inside_target=$host_target ;;
  esac
  if [ -n "${ATTND_IMAGE_CLIENT:-}" ]; then
    setpriv --reuid="${user%:*}" --regid="${user#*:}" --clear-groups \
      "$check_work/attnctl" --target="$host_target" "$@"
  else
    docker run --rm --network host --ipc host --user "$user" "${mount[@]}" \
      --entrypoint attnctl "$image" --target="$inside_target" "$@"
  fi
}

# Starts IMAGE as UID:GID with the image's own socket path and the ARGS after it, in the
# background; sets cid and sockdir (owned by UID:GID, as a host would prepare it).
start_attnd() {
  local image=$1 user=$2
  shift 2
  if [ -z "$check_work" ]; then
    check_work=$(mktemp -d /tmp/attnd-image-check.XXXXXX)
    chmod 0711 "$check_work"  # the client may run as the image's uid
    if [ -n "${ATTND_IMAGE_CLIENT:-}" ]; then install -m 0755 "$ATTND_IMAGE_CLIENT" "$check_work/attnctl"; fi
  fi
  sockdir=$(mktemp -d "$check_work/run.XXXXXX")
  chown "$user" "$sockdir"
  chmod 0750 "$sockdir"
  cid=$(docker run -d --network host --ipc host --user "$user" -v "$sockdir:/run/attnd" \
    "$image" --unix_socket=/run/attnd/attnd.sock "$@")
  check_containers+=("$cid")
}

# Waits for Docker's HEALTHCHECK (attnctl inside the container, as the image's user) to pass.
# Its first probe runs one --interval (10 s) after the start.
wait_healthy() {
  local status
  for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$cid")
    case $status in
      "running healthy") echo "image: $1: docker reports healthy" >&2; return ;;
      running*) sleep 1 ;;
      *) break ;;
    esac
  done
  echo "image: $1: not healthy ($status); its log:" >&2
  docker logs "$cid" 2>&1 | tail -20 >&2
  return 1
}

# docker stop: SIGTERM, the drain, exit 0, well within the drain time (30 s).
stop_attnd() {
  local start ms code
  start=$(date +%s%N)
  docker stop -t 40 "$cid" >/dev/null
  ms=$((($(date +%s%N) - start) / 1000000))
  code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
  echo "image: $1: docker stop took ${ms} ms, exit $code" >&2
  docker logs "$cid" 2>&1 | grep 'level=info stopped' >/dev/null &&
    [ "$code" = 0 ] && [ "$ms" -lt 30000 ]
}

# attnd's shared libraries all resolve in the image, and the CUDA runtime is not one of them.
check_libraries() {
  local image=$1 libs
  libs=$(docker run --rm --entrypoint ldd "$image" /usr/local/bin/attnd)
  if grep -q 'not found' <<<"$libs"; then
    echo "image: $image: attnd misses libraries:" >&2
    grep 'not found' <<<"$libs" >&2
    return 1
  fi
  if grep -qE 'libcudart|libcuda\.' <<<"$libs"; then
    echo "image: $image: attnd links the CUDA runtime dynamically" >&2
    return 1
  fi
}

# The CPU image as its default user (10001): the demo client runs as 10001 too, so its shm
# objects (0600) are ones attnd may open; health over the socket and TCP, /metrics, demo, stop.
check_cpu() {
  local image=$1 mport tport
  check_libraries "$image"
  mport=$(free_port)
  tport=$(free_port)
  start_attnd "$image" 10001:10001 --tcp_address="127.0.0.1:$tport" --insecure_tcp \
    --metrics_port="$mport" --metrics_bind=127.0.0.1 --backend=auto --pages_per_device=8192
  wait_healthy "$image"
  docker logs "$cid" 2>&1 | grep 'backend=cpu' >/dev/null
  client 10001:10001 "$image" "unix:$sockdir" health >/dev/null
  client 10001:10001 "$image" "tcp:$tport" health >/dev/null
  metrics_show "$mport" '^attnd_pages_total{device="0"} 8192'
  client 10001:10001 "$image" "unix:$sockdir" demo >"$check_work/demo.out" 2>&1 ||
    { tail -30 "$check_work/demo.out" >&2; return 1; }
  grep -q '^demo: PASS' "$check_work/demo.out"
  echo "image: $image: health SERVING (socket, TCP), /metrics, $(grep '^demo: wall' "$check_work/demo.out")" >&2
  stop_attnd "$image"
}

# The CUDA image on a machine without a GPU: --backend=auto falls back to the CPU. Run as root
# (--user 0:0), the other way the header of the Dockerfile offers: a root client's shm objects
# are then openable too, which the demo shows.
check_cuda() {
  local image=$1 out
  check_libraries "$image"
  # A CUDA build: asked for the CUDA backend, it looks for a device (a CPU build would say it
  # has no CUDA).
  out=$(docker run --rm "$image" --backend=cuda --unix_socket= --tcp_address=127.0.0.1:1 \
    --insecure_tcp --metrics_port=0 2>&1 || true)
  grep -q 'no CUDA device is visible' <<<"$out" ||
    { echo "image: $image: not a CUDA build? $out" >&2; return 1; }
  start_attnd "$image" 0:0 --metrics_port=0 --backend=auto --pages_per_device=8192
  wait_healthy "$image"
  docker logs "$cid" 2>&1 | grep 'backend=cpu' >/dev/null ||
    { echo "image: $image: no fallback to the CPU backend" >&2; return 1; }
  client 0:0 "$image" "unix:$sockdir" health >/dev/null
  client 0:0 "$image" "unix:$sockdir" demo >"$check_work/demo-cuda.out" 2>&1 ||
    { tail -30 "$check_work/demo-cuda.out" >&2; return 1; }
  grep -q '^demo: PASS' "$check_work/demo-cuda.out"
  echo "image: $image: backend=auto -> cpu, health SERVING, demo PASS as root" >&2
  stop_attnd "$image"
}

# Removes what the checks left: containers (if one failed midway) and the socket folders.
checks_cleanup() {
  if [ ${#check_containers[@]} -gt 0 ]; then
    docker rm -f "${check_containers[@]}" >/dev/null 2>&1 || true
  fi
  [ -z "$check_work" ] || rm -rf "$check_work"
}
