"""A GPU job for the GPU check (tests/gpu/check.sh): it reports which GPUs it sees, checks them
against the ones batchd assigned it, and multiplies matrices on them.

    python3 matmul.py N    # N: how many GPUs the job was given (gpusPerNode)

The assigned GPUs are the node's device indices in CUDA_VISIBLE_DEVICES. NVML numbers every
device of the machine whatever that variable says, so the UUIDs of the assigned indices, read
through NVML, must be exactly the UUIDs of the devices PyTorch sees. Exits 1 when they differ.
"""

from __future__ import annotations

import os
import sys
import time

import torch


def nvml_uuids(indices: list[int]) -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    return [str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in indices]


def main() -> int:
    expected = int(sys.argv[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    assigned = [int(i) for i in visible.split(",")] if visible else []
    seen = torch.cuda.device_count()
    print(f"CUDA_VISIBLE_DEVICES={visible!r}  assigned={assigned}  torch sees {seen} GPU(s)")
    problems = []
    if len(assigned) != expected:
        problems.append(f"batchd assigned {len(assigned)} GPUs, the job asked for {expected}")
    if seen != expected:
        problems.append(f"torch sees {seen} GPUs, the job asked for {expected}")
    if seen:
        props = [torch.cuda.get_device_properties(d) for d in range(seen)]
        torch_uuids = [str(p.uuid) for p in props]
        node_uuids = [u.removeprefix("GPU-") for u in nvml_uuids(assigned)]
        for d, p in enumerate(props):
            print(f"  cuda:{d} = {p.name}, {p.total_memory // 2**20} MiB, GPU-{torch_uuids[d]}")
        print(f"  NVML UUIDs of the assigned indices: {['GPU-' + u for u in node_uuids]}")
        if torch_uuids != node_uuids:
            problems.append("the GPUs torch sees are not the ones batchd assigned")
        device = torch.device("cuda:0")
    else:
        print(f"  torch.cuda.is_available() = {torch.cuda.is_available()}")
        device = torch.device("cpu")
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    runs = 10
    started = time.perf_counter()
    for _ in range(runs):
        c = a @ b
    total = c.float().sum().item()  # waits for the device
    seconds = time.perf_counter() - started
    rate = 2 * n**3 * runs / seconds / 1e12
    print(f"  {n}x{n} {dtype} matrix product on {device}: {rate:.1f} TFLOP/s (sum {total:.3e})")
    for problem in problems:
        print(f"FAIL: {problem}")
    print("OK" if not problems else "NOT OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
