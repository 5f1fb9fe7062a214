#!/usr/bin/env bash
# The programs the tests run beside the project: kcat (an independent Kafka client that checks
# the broker), prometheus (a real server that scrapes a running service) and promtool (the
# alert rules' unit tests; Debian ships it in the prometheus package), and for the container test
# (tests/containers) a Docker engine with docker-compose, and mmdebstrap for base images no
# registry serves here (dockerd: Debian's docker.io; a `docker` client alone is not an engine).
# Installs the missing ones from Debian's packages where it can (apt-get, as root or with
# passwordless sudo); otherwise, or if that fails, it names what to install and fails, so that
# `make test` does not start a suite that cannot pass.
set -euo pipefail

tools=(kcat prometheus promtool dockerd docker-compose mmdebstrap)
missing() {
  local tool
  for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || echo "$tool"
  done
}

need=($(missing))
[ ${#need[@]} -eq 0 ] && exit 0
# Debian package names: promtool comes with prometheus, dockerd is docker.io's.
packages=($(printf '%s\n' "${need[@]}" | sed -e 's/^promtool$/prometheus/' \
  -e 's/^dockerd$/docker.io/' | sort -u))

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=(env)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n env)
  else
    as_root=()
  fi
  if [ ${#as_root[@]} -gt 0 ]; then
    echo "installing ${packages[*]} (Debian packages) for the tests" >&2
    apt=(apt-get -qq -o DPkg::Lock::Timeout=300)
    if "${as_root[@]}" "${apt[@]}" update \
        && "${as_root[@]}" DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y \
             --no-install-recommends "${packages[@]}" >/dev/null; then
      need=($(missing))
      [ ${#need[@]} -eq 0 ] && exit 0
    fi
    echo "apt-get did not install: ${need[*]}" >&2
  fi
fi

cat >&2 <<MSG
The integration tests need: ${need[*]}, which could not be installed here.
Install them, then run \`make test\` again:
  Debian/Ubuntu:  sudo apt-get install kcat prometheus docker.io docker-compose mmdebstrap
                  (older Ubuntu: kafkacat, as kcat)
  macOS:          brew install kcat prometheus, and Docker Desktop
  elsewhere:      kcat from https://github.com/edenhill/kcat, prometheus from prometheus.io
MSG
exit 1
