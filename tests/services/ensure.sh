#!/usr/bin/env bash
# Installs (apt) and starts the services the tests talk to, where they are missing:
#   PostgreSQL on 127.0.0.1:5432, reachable as user postgres without a password;
#   a Docker Engine API (podman, containers on runc) on unix:///run/podman/podman.sock, with
#   the image localhost/busybox:test built from busybox (no registry can be reached), and
#   localhost/busybox-entrypoint:test, the same with an ENTRYPOINT and CMD of its own;
#   localhost/busybox-user:test, the same run as a user of its own (USER trainer, uid 1000).
# Safe to run again: what is already there and running is left as it is.
set -euo pipefail

PG_PORT=5432

say() { echo "services: $*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root to run: $*"; exit 1; fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

pg_ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }

ensure_postgres() {
  if [ -z "$(pg_bin)" ]; then
    say "installing PostgreSQL"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  if ! pg_ready; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      version=$(basename "$(dirname "$(pg_bin)")")
      as_root pg_createcluster "$version" main
    fi
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do pg_ready && break; sleep 0.5; done
    pg_ready || { say "PostgreSQL did not start"; exit 1; }
  fi
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
    # A fresh install asks for passwords over TCP: let local test connections in.
    local hba
    hba=$(as_root su postgres -c "psql -p $PG_PORT -Atc 'SHOW hba_file'")
    say "trusting local TCP connections in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    as_root su postgres -c "psql -p $PG_PORT -Atc 'SELECT pg_reload_conf()'" >/dev/null
    sleep 1
  fi
  say "PostgreSQL ready on 127.0.0.1:$PG_PORT"
}

PODMAN_SOCKET=/run/podman/podman.sock
TEST_IMAGE=localhost/busybox:test
ENTRYPOINT_IMAGE=localhost/busybox-entrypoint:test
USER_IMAGE=localhost/busybox-user:test

podman_ready() { curl -sf --unix-socket "$PODMAN_SOCKET" http://d/v1.41/version >/dev/null 2>&1; }

ensure_podman() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || [ ! -x /bin/busybox ]; then
    say "installing podman, runc and busybox"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc busybox-static curl >/dev/null
  fi
  if [ ! -f /etc/containers/containers.conf ]; then
    as_root mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' |
      as_root tee /etc/containers/containers.conf >/dev/null
  fi
  if ! podman_ready; then
    say "starting podman's Docker API on $PODMAN_SOCKET"
    as_root mkdir -p "$(dirname "$PODMAN_SOCKET")"
    as_root setsid nohup podman system service --time=0 "unix://$PODMAN_SOCKET" \
      >/tmp/batchd-podman.log 2>&1 < /dev/null &
    for _ in $(seq 1 60); do podman_ready && break; sleep 0.5; done
    podman_ready || { say "podman's API did not start"; exit 1; }
  fi
  if ! as_root podman image exists "$TEST_IMAGE" || ! as_root podman image exists "$ENTRYPOINT_IMAGE" ||
    ! as_root podman image exists "$USER_IMAGE"; then
    local root
    root=$(mktemp -d)
    mkdir -p "$root/bin" "$root/etc"
    cp /bin/busybox "$root/bin/"
    for c in sh echo sleep cat env ls kill true false id touch; do ln -s busybox "$root/bin/$c"; done
    printf 'root:x:0:0:root:/root:/bin/sh\ntrainer:x:1000:1000::/tmp:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\ntrainer:x:1000:\n' >"$root/etc/group"
    tar -C "$root" -cf "$root.tar" .
    as_root podman import -q "$root.tar" "$TEST_IMAGE" >/dev/null
    # the same, with an ENTRYPOINT and a CMD of its own, as many images have
    as_root podman import -q --change 'ENTRYPOINT ["/bin/echo", "entrypoint:"]' \
      --change 'CMD ["image-cmd"]' "$root.tar" "$ENTRYPOINT_IMAGE" >/dev/null
    # the same, run as a user of its own (not root), as many images are
    as_root podman import -q --change 'USER trainer' "$root.tar" "$USER_IMAGE" >/dev/null
    rm -rf "$root" "$root.tar"
  fi
  say "podman ready on $PODMAN_SOCKET with $TEST_IMAGE"
}

ensure_postgres
ensure_podman
