# kubetune's images, one target per component; the chart's image values name them:
#
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .
#   docker build --target server   -t ghcr.io/kubetune/server:0.1.0 .
#
# BASE is any Debian bookworm image with Python 3.11 and its venv module. The default needs a
# container registry; where none is reachable, `make images` builds one from Debian's packages
# (hack/images/base.sh). Every version is pinned by hack/requirements/, the pins the tests run.
# Each image runs as uid 1000 and writes nothing outside /tmp, its home and mounted volumes.
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

# `python -m kubetune.operator`: kopf, the Kubernetes and OpenAI clients; no torch.
FROM python AS operator
RUN python3 /opt/requirements/deps.py operator
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && pip check && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.operator", "--all-namespaces"]

# `python -m kubetune.trainer --config PATH` (torchrun for several GPUs): PyPI's CUDA build of
# torch (its nvidia libraries included: ~4.7 GB), transformers, PEFT, TRL; bitsandbytes for QLoRA.
FROM python AS trainer
ARG TORCH_VERSION=2.13.0
ARG BITSANDBYTES_VERSION=0.50.2
RUN pip install -q "torch==${TORCH_VERSION}"
RUN python3 /opt/requirements/deps.py trainer \
 && pip install -q "bitsandbytes==${BITSANDBYTES_VERSION}"
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install -q --no-deps /tmp/wheels/kubetune-*.whl && pip check && rm -rf /tmp/wheels
USER 1000:1000
WORKDIR /home/kubetune
CMD ["python", "-m", "kubetune.trainer", "--help"]

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
