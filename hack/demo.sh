#!/usr/bin/env bash
# `make demo`: the Daoist-voice bot end to end on this machine, from a fresh clone.
#
#   1. the Python environment (hack/venv.sh through `make -s venv`: built once, then reused);
#   2. the offline demo model (`kubetune demo-model`: built once into .kubetune/models/);
#   3. `kubetune run examples/daoyan-local.yaml --local --once`: validate the dataset, train a
#      LoRA adapter (.kubetune/runs/daoyan-local/), serve base model + adapter with vLLM, ask
#      both the article's two questions at temperature 0, print the answers side by side with
#      the final loss and the loss curve, and stop vLLM.
#
# Idempotent: a second `make demo` reuses the environment, the model and the finished run (a
# run is never overwritten), so it only starts vLLM and asks again. `rm -rf .kubetune` starts
# over. KUBETUNE_DEMO_ARGS adds flags to `kubetune run` (e.g. --port 8100).
set -euo pipefail
export PYTHONSAFEPATH=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$SECONDS

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/3 Python environment (make -s venv)"
VENV="$(make -s venv)"
echo "$VENV"
KUBETUNE="$VENV/bin/kubetune"

step "2/3 offline demo model (kubetune demo-model)"
"$KUBETUNE" demo-model

step "3/3 kubetune run examples/daoyan-local.yaml --local --once"
# shellcheck disable=SC2086  # KUBETUNE_DEMO_ARGS is a list of flags
"$KUBETUNE" run examples/daoyan-local.yaml --local --once --compare-base \
  --ask "如何应对压力?" --ask "如何找到内心的平静?" ${KUBETUNE_DEMO_ARGS:-}

echo
echo "make demo: done in $((SECONDS - start)) s. Serve it until Ctrl-C and chat with it:"
echo "  $KUBETUNE run examples/daoyan-local.yaml --local"
echo "  $KUBETUNE chat --local-run daoyan-local '如何应对压力?'"
