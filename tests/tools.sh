#!/usr/bin/env bash
# The programs the integration tests run beside the project: kcat (an independent Kafka client
# that checks the broker) and prometheus (a real server that scrapes a running service).
# Installs the missing ones from Debian's packages where it can (apt-get, as root or with
# passwordless sudo); elsewhere it names what to install and fails, so that `make test` does
# not run a suite that cannot pass.
set -euo pipefail

tools=(kcat prometheus)
missing=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=(env)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n env)
  else
    as_root=()
  fi
  if [ ${#as_root[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian packages) for the integration tests" >&2
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
  fi
fi

cat >&2 <<MSG
The integration tests need: ${missing[*]}, which this user cannot install here.
Install them, then run \`make test\` again:
  Debian/Ubuntu:  sudo apt-get install kcat prometheus
  macOS:          brew install kcat prometheus
  elsewhere:      kcat from https://github.com/edenhill/kcat, prometheus from prometheus.io
MSG
exit 1
