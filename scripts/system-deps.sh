#!/usr/bin/env bash
# The Debian packages the test suite uses as independent peers: dcmtk (storescu, echoscu),
# Xvfb and xauth (the display's window test), chromium (the report's screenshot) and
# chromium-driver (Selenium drives it for the web view's test), orthanc (a
# PACS forwarding to rtsc), postgresql (initdb and pg_ctl: a throwaway server for the history's
# PostgreSQL test), and for the PsychoPy thermometer example on Xvfb the libraries its
# pyglet loads outright (GLU, Mesa's software OpenGL, Xinerama, XFree86-VidMode, XInput).
# Installs the missing ones when run as root with apt-get; otherwise names them and fails.
set -euo pipefail
missing=()
command -v /usr/bin/storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v Xvfb >/dev/null 2>&1 || missing+=(xvfb)
command -v xauth >/dev/null 2>&1 || missing+=(xauth)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v /usr/bin/chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || missing+=(orthanc)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
for lib in libGLU.so.1:libglu1-mesa dri/swrast_dri.so:libgl1-mesa-dri \
           libXinerama.so.1:libxinerama1 libXxf86vm.so.1:libxxf86vm1 libXi.so.6:libxi6; do
  compgen -G "/usr/lib/*-linux-gnu/${lib%%:*}" >/dev/null || missing+=("${lib##*:}")
done
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
