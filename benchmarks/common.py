"""What every timm-nat benchmark shares: the attention shape table, the timer, peak tensor memory and
the one-cell-per-subprocess runner. Kept free of model code so a GPU benchmark can import it."""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, Optional, Sequence

HEAD_DIM, KERNEL = 32, 7  # NAT-Mini's attention layers
SHAPES: Dict[str, tuple] = {  # name: (batch, height, width, heads, dilation)
    "stage1": (8, 56, 56, 2, 1),  # NAT-Mini's four stages at 224x224, batch 8
    "stage1-d8": (8, 56, 56, 2, 8),  # DiNAT-Mini's dilated stage-1 layer
    "stage2": (8, 28, 28, 4, 1),
    "stage2-d4": (8, 28, 28, 4, 4),
    "stage3": (8, 14, 14, 8, 1),
    "stage4": (8, 7, 7, 16, 1),
    "map-640": (1, 160, 160, 2, 1),  # stage 1 of a 640x640 image
    "map-1344": (1, 336, 336, 2, 1),  # and of 1344x1344 (4.41x the pixels)
    "det-half": (1, 100, 168, 2, 1),  # a detection-size stage-1 map, half
    "det": (1, 200, 336, 2, 1),  # and full height and width
    "tiny": (2, 14, 14, 2, 1),  # a smoke test, seconds per cell
}
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                   synchronize: Optional[Callable[[], None]] = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``clock`` is wall time by default; ``time.process_time`` counts this process's CPU time (steadier on a
    shared machine; with one thread it is the time the work took when it ran). ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs after each call, inside the timed span, so asynchronous devices count.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def peak_tensor_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes held by tensors while ``fn()`` runs, above what they held before.

    CUDA: ``max_memory_allocated``. CPU: the profiler's allocation events replayed in order (RSS
    would also count what the allocator caches, or miss memory freed earlier and reused).
    """
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd import DeviceType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_cell(cmd: Sequence[str], timeout: Optional[float] = None) -> dict:
    """One benchmark cell in a fresh process (so no cell warms another's caches): the JSON object on the
    last line of its stdout, or ``{'error': ...}`` with the last line of its stderr."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:.0f}s")
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["?"])[-1][:80])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(value: Optional[float], baseline: Optional[float], digits: int = 2) -> str:
    """``value / baseline`` formatted, or '-' when either is missing."""
    return f"{value / baseline:.{digits}f}" if value and baseline else "-"
