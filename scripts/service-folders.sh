#!/bin/sh
# Prints the repository folders one service's image is built from: services/NAME, then the folders its
# services/NAME/local-packages.txt names (the edge embeds the gatekeeper), one a line.
# The Dockerfile copies only these into its build (so editing another service rebuilds nothing here),
# scripts/install-service.sh installs them, and tests/deploy/test_images.py copies the same.
#
#   scripts/service-folders.sh NAME      (from the repository root, or a directory holding services/)
set -eu
name=$1
if [ -z "$name" ] || [ ! -f "services/$name/pyproject.toml" ]; then
    echo "service-folders.sh: no service '$name' (a folder of services/ with a pyproject.toml)" >&2
    exit 1
fi
echo "services/$name"
if [ -f "services/$name/local-packages.txt" ]; then
    grep -v -e '^#' -e '^[[:space:]]*$' "services/$name/local-packages.txt"
fi
