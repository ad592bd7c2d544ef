#!/usr/bin/env bash
# The GPU check, for a machine with NVIDIA GPUs: a batchd daemon and one agent with
# `--gpus auto` on this machine, then two jobs on the process runtime. It shows
#   1. NVML discovery finds the GPUs, with their model and memory (the node as batchd shows it);
#   2. a job with gpusPerNode 1 sees exactly the GPU it was assigned, and multiplies matrices on it;
#   3. a job with gpusPerNode 0 sees no GPU.
# Run from the repository root with batchd importable by $PYTHON (default python3) and PyTorch
# importable by $JOB_PYTHON (default python3, found on the agent's PATH). Exits non-zero on any
# failure. docs/gpu-check.md holds a recorded run.
set -euo pipefail

PYTHON=${PYTHON:-python3}
JOB_PYTHON=${JOB_PYTHON:-python3}
GPUS=${GPUS:-auto}  # a number here simulates GPUs: a dry run of this script without any
PORT=${PORT:-18080}
state=$(mktemp -d /tmp/batchd-gpu-check.XXXXXX)
export BATCHD_SERVER="http://127.0.0.1:$PORT" BATCHD_STATE_DIR="$state"
batchd() { "$PYTHON" -m batchd.scheduler.cli "$@"; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== the machine, as nvidia-smi tells it"
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv || true

echo "== 1. discovery (batchd agent --gpus $GPUS)"
"$PYTHON" -c "from batchd.scheduler.agent import discover_gpus; print(discover_gpus('$GPUS'))"

printf '[server]\nlisten = "127.0.0.1:%s"\n[local]\nnodes = 0\n' "$PORT" >"$state/batchd.toml"
"$PYTHON" -m batchd.scheduler.cli serve --config "$state/batchd.toml" --state-dir "$state" \
  >"$state/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  kill -0 "${pids[0]}" || { cat "$state/serve.log"; exit 1; }
  batchd workspace create default >/dev/null 2>&1 && break
  sleep 0.2
done
batchd experiment create default
batchd cluster create gpu --vm-size Standard_NC40ads_H100_v5 --nodes 1
batchd token create --role agent --name gpu-0 --node gpu-0 >"$state/agent.token"
"$PYTHON" -m batchd.scheduler.cli agent --server "$BATCHD_SERVER" --token-file "$state/agent.token" --cluster default/gpu \
  --node-id gpu-0 --gpus "$GPUS" --runtimes process --work-dir "$state/agent" \
  >"$state/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do
  batchd node show gpu-0 --json 2>/dev/null | grep -q '"state": "ready"' && break
  sleep 0.2
done
echo "== the node as batchd shows it"
batchd node list
batchd node show gpu-0 --json | "$PYTHON" -c '
import json, sys
p = json.load(sys.stdin)["properties"]
print({k: p[k] for k in ("state", "gpus", "gpuModel", "gpuMemoryMb", "cpus", "memoryMb")})'

status=0
for gpus in 1 0; do
  echo "== $((3 - gpus)). a job with gpusPerNode $gpus"
  batchd job create "gpus-$gpus" --cluster gpu --gpus-per-node "$gpus" \
    --command "$JOB_PYTHON $PWD/tests/gpu/matmul.py $gpus"
  batchd job wait "gpus-$gpus" || status=1
  batchd job file stream "gpus-$gpus"
  batchd job file stream "gpus-$gpus" --file stderr.txt
  batchd job show "gpus-$gpus" --json | "$PYTHON" -c '
import json, sys
p = json.load(sys.stdin)["properties"]
print("state:", p["state"], " exit code:", p["executionInfo"]["exitCode"])'
  batchd job history "gpus-$gpus"
done
[ "$status" = 0 ] && echo "GPU CHECK PASSED" || { echo "GPU CHECK FAILED"; tail -20 "$state/agent.log"; }
exit "$status"
