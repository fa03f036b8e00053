#!/usr/bin/env bash
# Install the Debian packages listed in $1 (one per line, '#' comments) that are missing.
# As root it runs apt-get; otherwise it prints the command to run and carries on.
set -euo pipefail
list=${1:-apt-packages.txt}
missing=()
for pkg in $(sed 's/#.*//' "$list"); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "apt_install: missing Debian packages: ${missing[*]}" >&2
    echo "apt_install: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 0
fi
echo "apt_install: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
