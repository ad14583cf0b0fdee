# syntax=docker/dockerfile:1
# sam2serve container images. CI builds the server target with podman and runs it as the Helm chart does
# (.ci/image, tests/test_container.py); helm/sam2serve is written against it (uid 10001, ports, entrypoint,
# SAM2SERVE_* environment, engines read-only under /engines).
#
#   docker build -t sam2serve:0.1.0 .                                  # the server, CPU (default target)
#   docker build --target export -t sam2serve-export:0.1.0 .           # the chart's init container image
#   docker run --rm -p 50051:50051 -p 9090:9090 --read-only --tmpfs /tmp \
#     -v "$PWD/engines/sam2.1_hiera_tiny:/engines/sam2.1_hiera_tiny:ro" sam2serve:0.1.0
#
# Without a registry (as in CI), `bash .ci/image` makes a Debian bookworm base with mmdebstrap and passes it
# as --build-arg PYTHON_IMAGE=...; any image with python3.11 (and `python`, venv) on PATH will do.
#
# CUDA / TensorRT variant: the same python:3.11-slim base. The CUDA runtime, cuDNN and TensorRT come as
# pip wheels (onnxruntime-gpu[cuda,cudnn], tensorrt); the driver comes from the node through the NVIDIA
# container toolkit / GPU operator, so no nvidia/cuda base image is needed:
#   docker build --build-arg SERVER_EXTRAS=gpu,trt -t sam2serve:0.1.0-cuda .
#   docker build --target export --build-arg EXPORT_EXTRAS=export,trt -t sam2serve-export:0.1.0-cuda .
# TensorRT plans are specific to the GPU model and TensorRT version: they are built on the node by the
# chart's `tensorrt-plans` init container (sam2serve export trt), never in the image.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the sam2serve wheel (pure Python; the server and the export tools are one distribution) -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# setup.py generates the gRPC stubs (sam2serve/v1, never committed, excluded by .dockerignore) from protos/
# while the wheel is built: without it the wheel ships no stubs and the server dies at import.
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY server ./server
COPY export ./export
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; \
names = set(zipfile.ZipFile(glob.glob('/wheels/sam2serve-*.whl')[0]).namelist()); \
missing = {f'sam2serve/v1/{m}' for m in ('__init__.py', 'sam2serve_pb2.py', 'sam2serve_pb2_grpc.py')} - names; \
sys.exit(f'the wheel lacks the gRPC stubs {sorted(missing)}' if missing else 0)"

# ---- export: torch (CPU), Meta's sam2 pinned by hash, `sam2serve export` (the chart's init containers) ------
FROM ${PYTHON_IMAGE} AS export
# "export" for ONNX export; "export,trt" to also build TensorRT plans on a GPU node.
ARG EXPORT_EXTRAS=export
# The ONNX export runs on CPU: CPU torch wheels (a fraction of the CUDA ones' size).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# More pip options for torch and its dependencies, e.g. a local mirror (see README, "Container images").
ARG TORCH_PIP_OPTIONS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/tmp
RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel
# As .ci/setup: torch first (sam2's build imports it), then Meta's code by hash (the PyPI `sam2` is a
# third-party republication; see export/requirements-sam2.txt), then sam2serve with its export extra.
RUN pip install --index-url "${TORCH_INDEX_URL}" ${TORCH_PIP_OPTIONS} torch==2.14.1 torchvision==0.29.1
COPY export/requirements-sam2.txt /tmp/requirements-sam2.txt
RUN SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation --require-hashes -r /tmp/requirements-sam2.txt \
    && rm /tmp/requirements-sam2.txt
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/sam2serve-*.whl)[${EXPORT_EXTRAS}]" && rm -rf /wheels \
    && python -c "import sam2serve.v1.sam2serve_pb2_grpc, sam2serve_export.cli"
RUN groupadd --system --gid 10001 sam2serve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sam2serve
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["sam2serve"]
CMD ["export", "--help"]

# ---- server: the default target. sam2serve without torch, non-root, serves one engine directory ----------
FROM ${PYTHON_IMAGE} AS server
# "" for CPU; "gpu,trt" for the CUDA/TensorRT variant (onnxruntime-gpu, tensorrt, cuda-python).
ARG SERVER_EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/tmp
RUN groupadd --system --gid 10001 sam2serve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sam2serve
COPY --from=build /wheels /wheels
# The venv gets no pip of its own (the server has no use for one): the base's pip installs into it.
# With the gpu extra: onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, so only the GPU
# build is kept, with the CUDA 12 runtime and cuDNN 9 from NVIDIA's wheels (its `cuda,cudnn` extras).
RUN set -eu; \
    python -m venv --without-pip /opt/venv; \
    pip() { command pip --python /opt/venv/bin/python "$@"; }; \
    wheel="$(ls /wheels/sam2serve-*.whl)"; \
    if [ -n "${SERVER_EXTRAS}" ]; then pip install "${wheel}[${SERVER_EXTRAS}]"; else pip install "${wheel}"; fi; \
    case ",${SERVER_EXTRAS}," in *,gpu,*) \
      ort="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')"; \
      pip uninstall -y onnxruntime onnxruntime-gpu; \
      pip install "onnxruntime-gpu[cuda,cudnn]==${ort}" ;; \
    esac; \
    rm -rf /wheels; \
    python -c "import importlib.util, sys; sys.exit('torch in the server image' if importlib.util.find_spec('torch') else 0)"; \
    python -c "import sam2serve.v1.sam2serve_pb2_grpc, sam2serve.transport.server"
# The chart mounts the engines (read-only) at /engines and sets SAM2SERVE_ENGINES=/engines/<model>. Metrics
# listen on every interface of the container (the server alone defaults to loopback): publishing the port is
# the choice, as the chart does for pods.
ENV SAM2SERVE_ENGINES=/engines/sam2.1_hiera_tiny SAM2SERVE_PORT=50051 SAM2SERVE_METRICS_PORT=9090 \
    SAM2SERVE_METRICS_HOST=0.0.0.0
WORKDIR /tmp
USER 10001:10001
# gRPC (with grpc.health.v1), Prometheus /metrics, and fal's HTTP API when SAM2SERVE_HTTP_PORT=8080 is set
EXPOSE 50051 9090 8080
# Kubernetes probes it with native gRPC probes (see the chart); the image has no HEALTHCHECK of its own.
ENTRYPOINT ["sam2serve", "serve"]
