#!/usr/bin/env bash
# The GPU check, for a machine with NVIDIA GPUs: a batchd daemon and one agent with
# `--gpus auto` on this machine, then jobs on the process runtime. It shows
#   1. NVML discovery finds the GPUs, with their model and memory (the node as batchd shows it);
#   2. a job with gpusPerNode 1 sees exactly the GPU batchd assigned it (the one its log
#      records), and multiplies matrices on it; with two GPUs or more, another job holds GPU 0
#      meanwhile, so that the GPU assigned is not simply the first;
#   3. a job with gpusPerNode 0 sees no GPU.
# Run from the repository root with batchd importable by $PYTHON (default python3), and
# PyTorch and nvidia-ml-py importable by $JOB_PYTHON (default python3, found on the agent's
# PATH). Exits non-zero on any failure. docs/gpu-check.md holds a recorded run.
set -euo pipefail

PYTHON=${PYTHON:-python3}
JOB_PYTHON=${JOB_PYTHON:-python3}
GPUS=${GPUS:-auto}  # a number here simulates GPUs: a dry run of this script without any
PORT=${PORT:-18080}
WAIT=${WAIT:-300}  # seconds a job may take
state=$(mktemp -d /tmp/batchd-gpu-check.XXXXXX)
export BATCHD_SERVER="http://127.0.0.1:$PORT" BATCHD_STATE_DIR="$state"
batchd() { "$PYTHON" -m batchd.scheduler.cli "$@"; }
field() {  # field NODE|JOB KEY: one property of `batchd node|job show --json`
  "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["properties"][sys.argv[1]])' "$1"
}
fail() { echo "GPU CHECK FAILED: $*"; tail -20 "$state/agent.log" 2>/dev/null; exit 1; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== the machine, as nvidia-smi tells it"
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv || true

echo "== 1. discovery"
if [ "$GPUS" = auto ]; then
  echo "NVML (nvidia-ml-py), asked directly:"
  "$PYTHON" -c '
import pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    print(f"  {i}: {pynvml.nvmlDeviceGetName(h)}, "
          f"{pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20} MiB")' || fail "NVML does not load"
fi
echo "batchd agent --gpus $GPUS finds:"
"$PYTHON" -c "from batchd.scheduler.agent import discover_gpus; print(' ', discover_gpus('$GPUS'))"

printf '[server]\nlisten = "127.0.0.1:%s"\n[local]\nnodes = 0\n' "$PORT" >"$state/batchd.toml"
"$PYTHON" -m batchd.scheduler.cli serve --config "$state/batchd.toml" --state-dir "$state" \
  >"$state/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  kill -0 "${pids[0]}" || { cat "$state/serve.log"; fail "the daemon did not start"; }
  batchd workspace create default >/dev/null 2>&1 && break
  sleep 0.2
done
batchd experiment create default
batchd cluster create gpu --vm-size Standard_NC40ads_H100_v5 --nodes 1
batchd token create --role agent --name gpu-0 --node gpu-0 >"$state/agent.token"
"$PYTHON" -m batchd.scheduler.cli agent --server "$BATCHD_SERVER" --token-file "$state/agent.token" \
  --cluster default/gpu --node-id gpu-0 --gpus "$GPUS" --runtimes process \
  --work-dir "$state/agent" >"$state/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do
  [ "$(batchd node show gpu-0 --json 2>/dev/null | field state 2>/dev/null)" = ready ] && break
  sleep 0.2
done
echo "== the node as batchd shows it"
batchd node list
node=$(batchd node show gpu-0 --json)
[ "$(field state <<<"$node")" = ready ] || fail "the node is not ready"
gpus=$(field gpus <<<"$node")
echo "  gpus $gpus, gpuModel '$(field gpuModel <<<"$node")', gpuMemoryMb $(field gpuMemoryMb <<<"$node")"
if [ "$GPUS" = auto ]; then
  [ "$gpus" -gt 0 ] && [ "$(field gpuMemoryMb <<<"$node")" -gt 0 ] || fail "no GPU was found"
fi

logged_gpus() {  # logged_gpus NAME: the GPUs the log's JobScheduled gave job NAME, "0,1"
  batchd events export --store "sqlite:///$state/events.db" | "$PYTHON" -c '
import json, sys
ids, gpus = set(), None
for line in sys.stdin:
    event = json.loads(line)
    data = event["data"]
    if event["type"] == "JobSubmitted" and data["name"] == sys.argv[1]:
        ids.add(data["jobId"])
    elif event["type"] == "JobScheduled" and data["jobId"] in ids:
        gpus = data["tasks"][0]["gpus"]
print(",".join(map(str, gpus)))' "$1"
}

run() {  # run NAME GPUS: a job of matmul.py; it passes if it says OK and saw the GPUs logged
  local name=$1 want=$2 out logged visible
  batchd job create "$name" --cluster gpu --gpus-per-node "$want" \
    --command "$JOB_PYTHON $PWD/tests/gpu/matmul.py $want"
  if ! batchd job wait "$name" --timeout "$WAIT"; then
    status=1
    [ "$(batchd job show "$name" --json | field state)" = queued ] && return
  fi
  out=$(batchd job file stream "$name")
  echo "$out"
  batchd job file stream "$name" --file stderr.txt
  logged=$(logged_gpus "$name")
  visible=$(sed -n "s/^CUDA_VISIBLE_DEVICES='\([^']*\)'.*/\1/p" <<<"$out")
  echo "  the log says batchd assigned GPUs [$logged]; the job saw CUDA_VISIBLE_DEVICES='$visible'"
  [ "$logged" = "$visible" ] || status=1
  grep -q '^OK$' <<<"$out" || status=1
  batchd job history "$name"
}

status=0
if [ "$gpus" -ge 2 ]; then
  echo "== holding GPU 0 with another job"
  batchd job create hold --cluster gpu --gpus-per-node 1 --command 'sleep 600'
  for _ in $(seq 150); do
    [ "$(batchd job show hold --json 2>/dev/null | field state 2>/dev/null)" = running ] && break
    sleep 0.2
  done
  [ "$(batchd job show hold --json | field state)" = running ] || fail "hold did not start"
fi
echo "== 2. a job with gpusPerNode 1"
run gpus-1 1
if [ "$gpus" -ge 2 ]; then
  [ "$(logged_gpus gpus-1)" != "$(logged_gpus hold)" ] || fail "gpus-1 got the held GPU"
  batchd job terminate hold
  batchd job wait hold --timeout 60 >/dev/null || true
fi
echo "== 3. a job with gpusPerNode 0"
run gpus-0 0
[ "$status" = 0 ] || fail "a job did not see what it was assigned"
echo "GPU CHECK PASSED"
