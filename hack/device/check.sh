#!/usr/bin/env bash
# The trainer's GPU checks, as ONE call on a device machine (a session gets 15 minutes of device
# time in all, start included; its two steps are capped at 360 s and 120 s). It needs no
# network: everything it installs comes from .device/ (hack/device/bundle.sh). What it checks,
# most important first:
#
#   1. tests/e2e/test_trainer.py on CUDA (data-parallel tests excluded: one GPU): bf16 LoRA and
#      QLoRA (4-bit NF4, bitsandbytes) learn the demo job's answers word for word; a SIGTERM
#      mid-run checkpoints and the resumed run ends like an uninterrupted one; the learning and
#      output-folder tests of the CPU tier, now on the GPU path (bf16, kubetune's packed SDPA).
#   2. bench/trainer_throughput.py on a Llama-3-8B-shaped model (random bf16 weights): real
#      tokens/s of kubetune's engine against HF Trainer with padded batches, model-FLOPs
#      utilisation and peak GPU memory.
#
# Measured on an H200 (2026-11-29): the machine started in about 30 s. The first run's tests
# filled a 270 s cap before the QLoRA test (70 s in the second run, bf16 LoRA 60 s): the whole
# set needs about 320 s. The bench took about 80 s. TEST_K and the timeouts narrow a rerun.
#
# Here:       bash hack/device/bundle.sh
# The device: run(command="bash hack/device/check.sh", carry=[".device"], timeout_s=580)
# Here again: bash hack/device/collect.sh FILES_AT   (results into bench/results, README table)
set -uo pipefail
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1  # the repo root holds `operator/` (hack/venv.sh)
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/build/device-out}"
BENCH_ARGS="${BENCH_ARGS:---shapes llama3-8b --data mixed --batch-size 16 --steps 12 --warmup 2 --rounds 1 --engines hf-padded,kubetune,kubetune-per-segment,kubetune-padded}"
TEST_TIMEOUT="${TEST_TIMEOUT:-360}"
TEST_EACH_TIMEOUT="${TEST_EACH_TIMEOUT:-200}"  # pytest-timeout: a slow test still leaves a report
TEST_K="${TEST_K:-not workers}"  # the data-parallel tests need two GPUs
BENCH_TIMEOUT="${BENCH_TIMEOUT:-120}"
mkdir -p "$OUT"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/kubetune-site .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/kubetune-site
{
  nvidia-smi || true
  "$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
    # The bf16 matrix rate this card reaches, for reading the bench's MFU (data-sheet peak).
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12:.0f} TFLOP/s")
    del a, b
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "kubetune"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # report and go on: the tests say what it breaks
        print(name, "NOT IMPORTABLE:", repr(exc))
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== 1. trainer e2e on the GPU"
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/e2e/test_trainer.py -m e2e -k "$TEST_K" \
  --timeout "$TEST_EACH_TIMEOUT" --durations=0 -W default -p no:cacheprovider -v -ra \
  --junitxml "$OUT/trainer-e2e.xml" 2>&1 \
  | tee "$OUT/trainer-e2e.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/trainer-e2e.log"

echo "== 2. throughput and MFU"
cp bench/results/trainer_throughput.json "$OUT/trainer_throughput.json"  # rows are merged in
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "$BENCH_TIMEOUT" "$PY" bench/trainer_throughput.py $BENCH_ARGS \
  --out "$OUT/trainer_throughput.json" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
