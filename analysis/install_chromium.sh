#!/bin/sh
# Debian's chromium, for `python analysis/ui_check.py` (a headless look at the MLflow UI).
# Debian 12 and Ubuntu; run as root (or prefix with sudo). About 100 MB of packages.
set -eu
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
chromium --version
