#!/usr/bin/env bash
# Installs the Debian packages that tests/infra needs (Slurm, munge, Docker engine,
# debootstrap) and the other test tools (shellcheck, prometheus, chromium for the chat page),
# as root, quietly and idempotently. Services are not started here: the test fixtures start private daemons.
# Usage: bash .ci/infra.sh   (safe to run again; prints what it did and how long it took)
set -euo pipefail

packages=(
  slurmctld slurmd slurm-client munge    # the one-node Slurm cluster
  docker.io                              # dockerd, containerd, runc, docker-init
  debootstrap                            # the CPU test image's base, from the Debian mirror
  shellcheck prometheus                  # rendered shell scripts, the metrics scrape test
  chromium chromium-driver               # the chat page's browser test (tests/server/test_ui.py)
  fonts-dejavu-core fonts-wqy-microhei   # its screenshots: Latin and Chinese glyphs
  ca-certificates iproute2 procps tar curl
)

start=$(date +%s)
if [ "$(id -u)" -ne 0 ]; then
  echo "infra.sh: must run as root (apt-get install and the daemons of tests/infra)" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' maintainer scripts from starting system-wide daemons (dockerd with
  # its bridge and iptables rules, munged, slurmd): the fixtures run private ones.
  policy=/usr/sbin/policy-rc.d
  added_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added_policy=true
  fi
  trap '[ "$added_policy" = true ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "infra.sh: installed ${missing[*]}"
else
  echo "infra.sh: all ${#packages[@]} packages already installed"
fi

for tool in munged slurmctld slurmd sbatch dockerd containerd runc debootstrap shellcheck prometheus \
    chromium chromedriver; do
  command -v "$tool" >/dev/null || { echo "infra.sh: $tool missing after install" >&2; exit 1; }
done
echo "infra.sh: ready in $(( $(date +%s) - start ))s"
