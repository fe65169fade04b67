#!/usr/bin/env bash
# chipmunk set-up for a Debian 12 host (root). Idempotent: every step checks before it acts,
# so `npm test` and `npm run demo` can call it each time.
#
# What it installs and why:
#   - runc, podman (image store only), CNI plugins, iproute2, iptables, busybox-static, tar,
#     python3, sqlite3 (test images); redis, postgresql, nginx, memcached (compatibility suite)
#   - CRIU >= 4.2 into a private prefix (/opt/chipmunk/criu): bookworm's criu 3.17 fails on
#     kernels >= 6.13 (vDSO layout) and 4.1 cannot dump inet sockets here; 4.2 needs a newer
#     glibc than bookworm's, so it runs through its own dynamic loader and libraries and never
#     touches the system's libc.
#   - sysctls for lazy migration of large memory (fs.pipe-user-pages-soft=0) and of containers
#     in their own user namespace (vm.unprivileged_userfaultfd=1)
#   - npm dependencies (native better-sqlite3 builds from source)
set -euo pipefail

PREFIX=${CHIPMUNK_PREFIX:-/opt/chipmunk}
CRIU_MIN=${CHIPMUNK_CRIU_MIN:-4.2}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUIET=${CHIPMUNK_SETUP_QUIET:-}

log() { [ -n "$QUIET" ] || echo "setup: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "chipmunk needs root (CRIU, runc, network namespaces). Re-run as root."
command -v apt-get >/dev/null || die "apt-get not found: chipmunk's set-up supports Debian 12 hosts."

# ---------------------------------------------------------------- system packages
# python3 and sqlite3: the compatibility test image (src/devtools/images.ts, chipmunk/python);
# e2fsprogs: mkfs.ext4 for image writable layers (src/agent/runtime/rootfs.ts);
# etcd-server (3.4): the replicated state store of an HA control plane (`--store etcd://...`) and its tests.
APT_PACKAGES=(runc podman containernetworking-plugins iproute2 iptables busybox-static tar util-linux procps haproxy wrk python3 sqlite3 e2fsprogs etcd-server)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Programs of the compatibility suite (src/devtools/compat-images.ts copies their binaries into
# images; their clients check them from the host). Their own services are not wanted on the host:
# a policy-rc.d answering 101 keeps the install from starting them.
COMPAT_PACKAGES=(redis-server redis-tools postgresql postgresql-client nginx memcached)
missing=()
for p in "${COMPAT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (compatibility suite)"
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy_added=1; fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || { [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d; die "installing ${missing[*]} failed"; }
  [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- CRIU >= 4.2 (private prefix)
CRIU_WRAPPER="$PREFIX/bin/criu"
criu_ok() {
  [ -x "$CRIU_WRAPPER" ] || return 1
  local v; v=$("$CRIU_WRAPPER" --version 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] && dpkg --compare-versions "$v" ge "$CRIU_MIN"
}

# The mirror comes from this host's own apt configuration: we only add a newer suite of it.
apt_mirror() {
  local uri=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in /etc/apt/sources.list*: configure apt first"
  echo "$uri"
}

install_criu() {
  local suites=${CHIPMUNK_CRIU_SUITES:-"forky sid trixie-backports"}
  local mirror; mirror=$(apt_mirror)
  local work="$PREFIX/criu-apt"
  mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs"
  local best_suite="" best_ver=""
  for suite in $suites; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$work/sources.list"
    local opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o Dir::State::Lists="$work/lists" -o Dir::State::status=/dev/null
                -o Dir::Cache="$work" -o APT::Get::List-Cleanup=0)
    apt-get "${opts[@]}" update -qq >/dev/null 2>&1 || { log "suite $suite not reachable"; continue; }
    local v; v=$(apt-cache "${opts[@]}" policy criu 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -n "$v" ] && [ "$v" != "(none)" ] && dpkg --compare-versions "$v" ge "$CRIU_MIN"; then
      best_suite=$suite; best_ver=$v; break
    fi
  done
  [ -n "$best_suite" ] || die "no criu >= $CRIU_MIN in suites ($suites) of $mirror; set CHIPMUNK_CRIU_SUITES to a suite that has one"
  log "installing criu $best_ver from $best_suite into $PREFIX/criu"
  local opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$work/lists" -o Dir::State::status=/dev/null -o Dir::Cache="$work")
  local pkgs
  pkgs=$(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
           --no-breaks --no-replaces --no-enhances criu 2>/dev/null | grep -v '^ ' | grep -v '^<' | sort -u)
  rm -rf "$work/debs"; mkdir -p "$work/debs"
  (cd "$work/debs" && apt-get "${opts[@]}" download $pkgs >/dev/null 2>&1) \
    || (cd "$work/debs" && for p in $pkgs; do apt-get "${opts[@]}" download "$p" >/dev/null 2>&1 || true; done)
  ls "$work/debs"/criu_*.deb >/dev/null 2>&1 || die "could not download criu's packages from $best_suite"
  local root="$PREFIX/criu"
  rm -rf --one-file-system "$root.new"; mkdir -p "$root.new"
  for d in "$work/debs"/*.deb; do dpkg -x "$d" "$root.new"; done
  rm -rf --one-file-system "$root"; mv "$root.new" "$root"
  local ld; ld=$(ls "$root"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root"/lib64/ld-linux-x86-64.so.2 2>/dev/null | head -n1 || true)
  [ -n "$ld" ] || die "criu's dependency closure has no dynamic loader (libc6 missing from the download)"
  mkdir -p "$PREFIX/bin"
  cat >"$CRIU_WRAPPER" <<EOF
#!/bin/sh
# criu $best_ver from Debian $best_suite, run with its own glibc (installed by chipmunk's setup)
exec "$ld" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" "$root/usr/sbin/criu" "\$@"
EOF
  chmod 755 "$CRIU_WRAPPER"
  criu_ok || die "installed criu does not run: try '$CRIU_WRAPPER --version'"
}
criu_ok || install_criu
# Podman (and runc without --criu) run whatever `criu` is first on PATH; Debian's podman
# package pulls in bookworm's broken criu 3.17 at /usr/sbin/criu. /usr/local/sbin comes first.
if [ "$(readlink -f /usr/local/sbin/criu 2>/dev/null)" != "$CRIU_WRAPPER" ]; then
  mkdir -p /usr/local/sbin
  ln -sf "$CRIU_WRAPPER" /usr/local/sbin/criu
fi

# ---------------------------------------------------------------- kernel settings
# Lazy dumps of large memory fail with 'page-pipe: tee: Operation not permitted' under the
# default per-user pipe page budget.
if [ "$(cat /proc/sys/fs/pipe-user-pages-soft)" != 0 ]; then
  sysctl -qw fs.pipe-user-pages-soft=0
fi
# The lazy page server serves pages through pipes it resizes; without CAP_SYS_RESOURCE a pipe
# may not grow past fs.pipe-max-size (1 MiB by default) and serving fails with
# 'page-pipe: tee: Operation not permitted'.
PIPE_MAX=268435456
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
  sysctl -qw fs.pipe-max-size=$PIPE_MAX
fi
# A lazy restore opens its userfaultfd inside the container's user namespace, where it lacks the
# host's CAP_SYS_PTRACE: the kernel refuses it ('Unable to open an userfaultfd descriptor:
# Operation not permitted') unless unprivileged processes may use userfaultfd.
if [ "$(cat /proc/sys/vm/unprivileged_userfaultfd)" != 1 ]; then
  sysctl -qw vm.unprivileged_userfaultfd=1
fi
mkdir -p /etc/sysctl.d
printf 'fs.pipe-user-pages-soft = 0\nfs.pipe-max-size = %s\nvm.unprivileged_userfaultfd = 1\n' "$PIPE_MAX" >/etc/sysctl.d/90-chipmunk.conf
if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then sysctl -qw net.ipv4.ip_forward=1; fi

# ---------------------------------------------------------------- podman configuration
# runc (crun refuses hybrid cgroups) and ulimits we are allowed to set (no CAP_SYS_RESOURCE).
mkdir -p /etc/chipmunk
cat >/etc/chipmunk/containers.conf <<'EOF'
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
EOF

# ---------------------------------------------------------------- npm dependencies
cd "$REPO_DIR"
stamp=node_modules/.chipmunk-lock-hash
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing npm dependencies"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" >"$stamp"
fi
log "ok"
