# shellcheck shell=bash
# Sourced by scripts/image.sh: a Docker daemon to talk to, and the Debian 12 base image.

# The dockerd that DOCKER_HOST (or /var/run/docker.sock) reaches, or else one of our own with its
# data (images, build cache: what makes a second build warm) in $1/docker. Ours has no bridge and
# touches no iptables: builds and containers use the host's network, so nothing on the machine
# changes but two processes and two folders. Sets dockerd_pid when it started one.
dockerd_pid=""
docker_up() {
  if docker info >/dev/null 2>&1; then
    echo "image: using the running dockerd" >&2
    return
  fi
  local state=$1
  mkdir -p "$state/docker"
  # A short path: containerd's sockets live under the exec root and must fit in 108 bytes.
  dockerd_run=$(mktemp -d /tmp/attnd-dockerd.XXXXXX)
  export DOCKER_HOST="unix://$dockerd_run/docker.sock"
  dockerd --data-root="$state/docker" --exec-root="$dockerd_run/exec" \
    --pidfile="$dockerd_run/dockerd.pid" --host="$DOCKER_HOST" \
    --bridge=none --iptables=false --ip6tables=false >"$state/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 150); do
    if docker info >/dev/null 2>&1; then
      echo "image: started dockerd (pid $dockerd_pid, log $state/dockerd.log)" >&2
      return
    fi
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "image: dockerd did not come up; its log:" >&2
  tail -20 "$state/dockerd.log" >&2
  return 1
}

# Stops the dockerd docker_up started (it stops its containerd), if any.
docker_down() {
  [ -n "$dockerd_pid" ] || return 0
  kill -TERM "$dockerd_pid" 2>/dev/null || true
  wait "$dockerd_pid" 2>/dev/null || true
  # dockerd leaves its host-network namespace bind-mounted in the exec root.
  awk -v root="$dockerd_run/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount "$m" || umount -l "$m"; done
  rm -rf "$dockerd_run"
  dockerd_pid=""
}

# The first Debian mirror (not the security one) of this machine's apt sources: the image's
# packages come from where the host's do.
debian_mirror() {
  local kind=$1 m
  m=$({ grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
        grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
          awk '{print ($2 ~ /^\[/) ? $3 : $2}'; } | grep -E "$kind" | head -n1 || true)
  echo "$m"
}

# Imports $1 (the base of every stage) from debootstrap, unless the daemon has it: no image
# registry is needed. minbase with the docs, man pages, locales and apt lists left out, as
# Docker's debian:12-slim does, and the same exclusions for what stages install on top.
base_image() {
  local name=$1
  docker image inspect "$name" >/dev/null 2>&1 && return
  local mirror security rootfs
  mirror=${ATTND_DEBIAN_MIRROR:-$(debian_mirror '/debian/?$')}
  mirror=${mirror:-http://deb.debian.org/debian}
  security=$(debian_mirror 'security')
  security=${security:-http://deb.debian.org/debian-security}
  rootfs=$(mktemp -d /tmp/attnd-rootfs.XXXXXX)
  echo "image: debootstrap bookworm from $mirror" >&2
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    return 1
  fi
  rm -f "$rootfs.log"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "$security" >"$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  echo 'APT::Keep-Downloaded-Packages "false";' >"$rootfs/etc/apt/apt.conf.d/slim"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/log/*.log
  find "$rootfs/var/lib/apt/lists" "$rootfs/var/cache/apt" -type f -delete
  tar -C "$rootfs" -c . | docker import - "$name" >/dev/null
  rm -rf "$rootfs"
}
