#!/usr/bin/env bash
# The Debian packages the test suite uses as independent peers: dcmtk (storescu, echoscu),
# Xvfb and xauth (the display's window test), chromium (the report's screenshot), orthanc (a
# PACS forwarding to rtsc).
# Installs the missing ones when run as root with apt-get; otherwise names them and fails.
set -euo pipefail
missing=()
command -v /usr/bin/storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v Xvfb >/dev/null 2>&1 || missing+=(xvfb)
command -v xauth >/dev/null 2>&1 || missing+=(xauth)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages for the tests: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "the tests need these Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
