# pancseg in a container: `docker build -t pancseg .` then `docker run --rm -v "$PWD:/work" pancseg`
# runs `pancseg demo` into ./pancseg_demo. README.md ("Container") has the CUDA build and GPU runs.
#
# BASE_IMAGE: python:3.11-slim (CPU, the default) or a CUDA runtime image such as
#   nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 (Python is installed from the distribution there).
# TORCH_INDEX: where torch comes from; the CPU wheels (about 200 MB instead of several GB with CUDA
#   libraries) by default, https://download.pytorch.org/whl/cu124 for the CUDA image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/cache

RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv python3-pip && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/pancseg
ENV PATH=/opt/pancseg/bin:$PATH

# torch and torchvision (which nnU-Net's network library pulls in through timm) first, from the chosen
# index, so that pancseg's dependencies do not pull the CUDA build.
RUN pip install --index-url "${TORCH_INDEX}" torch torchvision
WORKDIR /opt/pancseg-src
COPY pyproject.toml README.md ./
COPY pancreas_cli ./pancreas_cli
# doctor fails the build on what would only fail later, e.g. a torchvision built for another torch.
RUN pip install . && pancseg doctor

# Run as any user (`docker run --user "$(id -u):$(id -g)"`): outputs go to the mounted /work.
WORKDIR /work
ENTRYPOINT ["pancseg"]
CMD ["demo"]
