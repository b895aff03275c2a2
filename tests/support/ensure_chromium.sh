#!/bin/sh
# Installs Debian's chromium for the dashboard's browser test when it is missing (CI runs as root).
# Never fails the build: without chromium the browser test skips and says why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: installing chromium (Debian package) for the dashboard browser test"
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
    || echo "ensure_chromium: could not install chromium; the browser test will skip"
else
  echo "ensure_chromium: chromium missing and not root with apt-get; the browser test will skip"
fi
exit 0
