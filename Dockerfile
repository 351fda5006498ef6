# syntax=docker/dockerfile:1
# Every Modelplex image, from one recipe: the service is the build argument. From the repository root:
#   docker build --build-arg SERVICE=text -t modelplex/text .
# SERVICE: edge, catalog, or a modality backend (a row of libs/modelplex_kit/modalities); skaffold.yaml
# builds them all. What differs between services follows from the service's own folder and the registry:
#   - a service whose pyproject.toml depends on llama-cpp-python gets the portable llama.cpp build
#     (scripts/llama-wheel.sh, the flags `make venv` uses) and, at run time, libgomp (its OpenMP runtime);
#   - services/<name>/local-packages.txt, requirements-no-deps.txt: see scripts/install-service.sh;
#   - its port, listen address and health check: modelplex_kit.container (a backend's port is its
#     registry row's; gRPC 5005x/5006x, HTTP 8080 for the edge, Prometheus metrics on 9090 where set).
ARG PYTHON_IMAGE=python:3.11-slim

# -------------------------------------------------------------- sources stage
# Only this service's folders go on (scripts/service-folders.sh): editing another service leaves this
# image's later layers cached.
FROM ${PYTHON_IMAGE} AS sources
ARG SERVICE
WORKDIR /context
COPY scripts/service-folders.sh scripts/
COPY services/ services/
RUN test -n "${SERVICE}" || { echo "build with --build-arg SERVICE=<a folder of services/>" >&2; exit 1; } \
 && for folder in $(scripts/service-folders.sh "${SERVICE}"); do \
      mkdir -p "/picked/${folder}" && cp -a "${folder}/." "/picked/${folder}/"; \
    done

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
ARG SERVICE
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt ./
COPY scripts/ scripts/
# The portable llama.cpp build for a service that needs it (a toolchain in this stage only), before the
# sources so that editing them does not recompile llama.cpp; the install below takes it from /wheels.
COPY --from=sources /picked/services/${SERVICE}/pyproject.toml /tmp/service-pyproject.toml
RUN mkdir -p /wheels \
 && if grep -q '"llama-cpp-python' /tmp/service-pyproject.toml; then \
      apt-get update \
      && apt-get install -y --no-install-recommends build-essential cmake git \
      && rm -rf /var/lib/apt/lists/* \
      && scripts/llama-wheel.sh build python /wheels; \
    fi
ENV PIP_FIND_LINKS=/wheels \
    PIP_ONLY_BINARY=llama-cpp-python
COPY protos/ protos/
COPY libs/ libs/
COPY --from=sources /picked/ ./

# The service and its libraries, non-editable, in a venv that the runtime stage copies whole
# (gRPC stubs generated into it). tests/deploy/test_images.py runs the same script.
RUN pip install -c constraints.txt grpcio-tools \
 && scripts/install-service.sh "${SERVICE}" /opt/venv
# Debian packages the runtime needs: llama.cpp's OpenMP runtime where llama.cpp is installed.
RUN if ls /wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then echo libgomp1; fi > /opt/runtime-packages.txt

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODELPLEX_SERVICE=${SERVICE}
COPY --from=build /opt/runtime-packages.txt /opt/runtime-packages.txt
RUN if [ -s /opt/runtime-packages.txt ]; then \
      apt-get update \
      && xargs apt-get install -y --no-install-recommends < /opt/runtime-packages.txt \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid 10001 modelplex \
 && useradd --system --uid 10001 --gid modelplex --home-dir /home/modelplex --create-home --shell /usr/sbin/nologin modelplex
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/modelplex
USER 10001:10001
# Listens on every interface at its port (unless MODELPLEX_<SERVICE>_LISTEN / _HOST say otherwise).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "modelplex_kit.container", "health"]
ENTRYPOINT ["python", "-m", "modelplex_kit.container", "serve"]
