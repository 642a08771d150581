#!/usr/bin/env bash
# Makes the local Debian 12 (bookworm) base image that the CPU image builds on, where no image registry is
# reachable: debootstrap (minbase) from a Debian mirror, imported into the local Docker engine.
#
#   sudo docker/make-base.sh                    # -> local/debian:bookworm (skipped when it exists)
#   sudo docker/make-base.sh --force            # make it again
#   MIRROR=http://ftp.de.debian.org/debian sudo docker/make-base.sh
#
# MIRROR defaults to the Debian mirror named in /etc/apt/sources.list.d/*.sources (deb822) or
# /etc/apt/sources.list, else http://deb.debian.org/debian. IMAGE names the result. Needs root, debootstrap
# and a running Docker engine.
set -euo pipefail

IMAGE=${IMAGE:-local/debian:bookworm}
SUITE=bookworm
force=0
[[ ${1:-} == --force ]] && force=1

die() { echo "make-base: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"

if [[ $force == 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "make-base: $IMAGE exists (use --force to make it again)"
  exit 0
fi

if [[ -z ${MIRROR:-} ]]; then
  # the first plain Debian archive URI the host's apt uses (not -security, not third-party repositories)
  MIRROR=$(grep -hoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
             /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
           | grep -oE 'https?://[^[:space:]]+' | head -n 1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
MIRROR=${MIRROR%/}
SECURITY=${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}

root=$(mktemp -d /var/tmp/scoremri-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "make-base: debootstrap --variant=minbase $SUITE from $MIRROR"
t0=$(date +%s)
nice -n 10 debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
rm -f "$root.log"

# apt sources of the image: the mirror, updates and security; no caches or package lists left behind
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
SOURCES
# the image's apt keeps no downloaded packages (as Debian's official images do)
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
: >"$root/etc/machine-id"
# nothing of the host: resolv.conf and hostname come from the engine at run time
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"

tar --numeric-owner -C "$root" -c . \
  | docker import \
      --change 'CMD ["bash"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "debootstrap --variant=minbase $SUITE $MIRROR ($(date -u +%Y-%m-%d))" \
      - "$IMAGE" >/dev/null
echo "make-base: $IMAGE made in $(( $(date +%s) - t0 )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
