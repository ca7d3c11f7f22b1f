#!/bin/sh
# Fetch ONNX Runtime C/C++ API headers (API 21) from Debian's libonnxruntime-dev
# without installing anything: apt runs against a private sources.list/state/cache
# under $1, the .deb is sha256-checked and unpacked there.
# Usage: fetch_ort_headers.sh CACHE_DIR   → headers in CACHE_DIR/root/usr/include/onnxruntime
set -eu
cache=$1
version=1.21.0+dfsg-1
sha256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
# Reuse the Debian mirror host this machine is configured with (default deb.debian.org).
mirror=$(grep -hvE '^[[:space:]]*#' /dev/null /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
         /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -oE 'https?://[^ ]*/debian/?( |$)' \
         | head -n1 | tr -d ' ' | sed 's:/*$::')
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/apt/etc/preferences.d"
echo "deb $mirror trixie main" > "$cache/apt/sources.list"
apt_opts="-o Dir::Etc::SourceList=$cache/apt/sources.list -o Dir::Etc::SourceParts=/dev/null
 -o Dir::Etc::PreferencesParts=$cache/apt/etc/preferences.d -o Dir::State::Lists=$cache/apt/lists
 -o Dir::State::Status=/dev/null -o Dir::Cache=$cache/apt/cache -o Debug::NoLocking=1
 -o APT::Sandbox::User=root"
# shellcheck disable=SC2086
apt-get -qq $apt_opts update
cd "$cache"
rm -f libonnxruntime-dev_*.deb
# shellcheck disable=SC2086
apt-get -qq $apt_opts download "libonnxruntime-dev=$version"
deb=$(ls libonnxruntime-dev_*.deb)
echo "$sha256  $deb" | sha256sum -c --quiet -
rm -rf root && dpkg-deb -x "$deb" root
test -f root/usr/include/onnxruntime/onnxruntime_c_api.h
