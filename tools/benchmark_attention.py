"""Speed and memory of the na2d backends against NATTEN's own na2d (no RPB), one table, one run.

    .venv/bin/python tools/benchmark_attention.py [--device cpu|cuda] [--repeats N] [--quick]
    .venv/bin/python tools/benchmark_attention.py --legacy   # legacy NATTEN API path, see LEGACY_SHAPES

Shapes are NAT-Mini's attention layers (head dim 32, kernel 7): stage 1 (batch 8, 56x56,
2 heads) with dilation 1 and 8 (DiNAT), down to stage 4 (7x7, 16 heads), plus detection-size
maps (batch 1, 2 heads, 100x168 and 200x336: twice the height and width). Every cell runs in
a fresh subprocess. "Peak extra memory" is what tensors hold above the inputs during one call
(timm_nat.benchmark.peak_tensor_bytes: allocation events on CPU, max_memory_allocated on CUDA).
Times are medians after one warm-up call. Our backends run with RPB; NATTEN (the baseline) cannot, so it runs without.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (batch, height, width, heads, dilation)
    "stage1": (8, 56, 56, 2, 1),
    "stage1-d8": (8, 56, 56, 2, 8),
    "stage2": (8, 28, 28, 4, 1),
    "stage2-d4": (8, 28, 28, 4, 4),
    "stage3": (8, 14, 14, 8, 1),
    "stage4": (8, 7, 7, 16, 1),
    "det-half": (1, 100, 168, 2, 1),
    "det": (1, 200, 336, 2, 1),
}
HEAD_DIM, KERNEL = 32, 7
BACKENDS = ("natten", "tiled", "flex", "reference")


def measure(shape: str, backend: str, mode: str, device: str, repeats: int) -> dict:
    """One cell, in this process: peak extra memory of the first call, then median time."""
    import torch
    from timm_nat.attention import na2d, use_backend
    from timm_nat.benchmark import peak_tensor_bytes

    batch, height, width, heads, dilation = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    train = mode == "fwd+bwd"
    q, k, v = (torch.randn(batch, height, width, heads, HEAD_DIM, device=device, generator=gen, requires_grad=train)
               for _ in range(3))
    rpb = None if backend == "natten" else torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, device=device,
                                                        generator=gen, requires_grad=train)
    grad = torch.randn_like(q) if train else None

    def call():
        with use_backend(backend), torch.set_grad_enabled(train):
            out = na2d(q, k, v, KERNEL, dilation, rpb=rpb)
            if train:
                out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    peak = peak_tensor_bytes(call, device)
    times = []
    for _ in range(repeats if first < 20 else 1):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return dict(ms=statistics.median(times) * 1e3, first_ms=first * 1e3, peak_mb=peak / 2**20)


def _natten_score_matrix_gb(shape: str) -> float:
    batch, height, width, heads, _ = SHAPES[shape]
    return batch * heads * (height * width) ** 2 * 4 / 2**30


def _skip_reason(shape, backend, mode, device, total_gb):
    if device == "cpu" and backend in ("natten", "flex") and mode == "fwd+bwd":
        return "no CPU backward"
    if backend == "natten" and device == "cpu":
        need = _natten_score_matrix_gb(shape)
        if need > 0.5 * total_gb:  # NATTEN 0.20+ on CPU is unfused flex: it materialises N x N scores
            return f"does not fit: needs >= {need:.0f} GB for the N x N scores"
    if backend == "flex" and device == "cpu" and shape.startswith("det"):
        return "block mask needs N x N evaluation"
    return None


def _run_subprocess(cmd, timeout):
    """One benchmark cell in a fresh process: its JSON result, or ``{'error': ...}``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout}s")
    if done.returncode != 0:
        lines = (done.stderr.strip().splitlines() or ["?"])
        return dict(error=lines[-1][:60])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_cell(shape, backend, mode, device, repeats, timeout):
    cmd = [sys.executable, __file__, "--cell", shape, backend, mode, "--device", device, "--repeats", str(repeats)]
    return _run_subprocess(cmd, timeout)


# --legacy: the legacy NATTEN API (timm_nat.compat) at NAT-Mini's stage shapes, against natten-mps'
# pure-PyTorch legacy shim (optional: `pip install natten-mps`; its rows are skipped when absent).
# Inputs in the legacy layout [batch, heads, H, W, head_dim]; all with RPB, kernel 7, dilation 1.
LEGACY_SHAPES = {  # name: (batch, height, width, heads)
    "stage1": (8, 56, 56, 2),
    "stage2": (8, 28, 28, 4),
    "stage3": (8, 14, 14, 8),
    "stage4": (8, 7, 7, 16),
}
LEGACY_IMPLS = {
    "compat": "timm_nat.compat natten2dqkrpb -> softmax -> natten2dav",
    "compat-fused": "timm_nat na2d (what compat.NeighborhoodAttention2D runs without attention dropout)",
    "natten-mps": "natten_mps.compat.v014 natten2dqkrpb -> softmax -> natten2dav",
}


def _legacy_attention(impl: str):
    """attention(q, k, v, rpb) in the legacy layout for one of LEGACY_IMPLS (ImportError if absent)."""
    if impl == "compat-fused":
        from timm_nat.attention import na2d

        def fused(q, k, v, rpb):
            q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
            return na2d(q, k, v, KERNEL, 1, rpb=rpb).permute(0, 3, 1, 2, 4)
        return fused
    if impl == "compat":
        from timm_nat.compat import natten2dav, natten2dqkrpb
    else:
        from natten_mps.compat.v014 import natten2dav, natten2dqkrpb

    def unfused(q, k, v, rpb):
        attn = natten2dqkrpb(q * HEAD_DIM ** -0.5, k, rpb, KERNEL, 1).softmax(dim=-1)
        return natten2dav(attn, v, KERNEL, 1)
    return unfused


def measure_legacy(shape: str, impl: str, mode: str, repeats: int, threads: int = 0) -> dict:
    """One legacy cell on CPU, in this process: median time, peak extra memory, and max abs
    difference of the output from timm_nat's reference backend."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    from timm_nat.attention.reference import na2d_reference
    from timm_nat.benchmark import peak_tensor_bytes

    attention = _legacy_attention(impl)
    batch, height, width, heads = LEGACY_SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    train = mode == "fwd+bwd"
    q, k, v = (torch.randn(batch, heads, height, width, HEAD_DIM, generator=gen, requires_grad=train) for _ in range(3))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=gen, requires_grad=train)
    grad = torch.randn_like(q)

    def call():
        with torch.set_grad_enabled(train):
            out = attention(q, k, v, rpb)
            if train:
                out.backward(grad)
        return out

    with torch.no_grad():
        expected = na2d_reference(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), (KERNEL, KERNEL), (1, 1), rpb,
                                  HEAD_DIM ** -0.5).permute(0, 3, 1, 2, 4)
    err = (call().detach() - expected).abs().max().item()
    peak = peak_tensor_bytes(call, "cpu")
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return dict(ms=statistics.median(times) * 1e3, cpu_ms=statistics.median(cpu_times) * 1e3, peak_mb=peak / 2**20,
                max_err=err)


def _run_legacy_cell(shape, impl, mode, repeats, timeout, threads):
    cmd = [sys.executable, __file__, "--legacy-cell", shape, impl, mode, "--repeats", str(repeats),
           "--threads", str(threads)]
    return _run_subprocess(cmd, timeout)


def legacy_main(repeats: int, timeout: int, threads: int) -> int:
    """The --legacy table: every LEGACY_IMPLS row at every LEGACY_SHAPES shape, fwd and fwd+bwd."""
    import importlib.util

    import torch
    if threads:
        torch.set_num_threads(threads)
    has_mps = importlib.util.find_spec("natten_mps") is not None
    print(f"legacy NATTEN API benchmark: cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"head_dim {HEAD_DIM}, kernel {KERNEL}, dilation 1, with RPB; layout [B, heads, H, W, D]")
    for impl, what in LEGACY_IMPLS.items():
        print(f"  {impl:<13} {what}")
    if not has_mps:
        print("  (natten-mps is not installed: its rows are skipped; pip install natten-mps to include them)")
    print("  wall: median wall-clock ms; cpu: median process CPU ms (steadier on a shared machine, equal to the\n"
          "  work with --threads 1); x mps: natten-mps' cpu ms over this row's")
    header = (f"{'shape':<8} {'B,H,W,heads':<13} {'impl':<13} {'fwd wall':>9} {'fwd cpu':>8} {'f+b wall':>9} "
              f"{'f+b cpu':>8} {'f+b peak MB':>12} {'max err':>8} {'fwd x mps':>10} {'f+b x mps':>10}")
    print(header)
    print("-" * len(header))
    for shape in LEGACY_SHAPES:
        cells = {}
        for impl in LEGACY_IMPLS:
            if impl == "natten-mps" and not has_mps:
                continue
            cells[impl] = {mode: _run_legacy_cell(shape, impl, mode, repeats, timeout, threads)
                           for mode in ("fwd", "fwd+bwd")}
        for impl, cell in cells.items():
            def fmt(mode, key, width, digits=1):
                value = cell[mode].get(key)
                return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

            def ratio(mode):
                base, ours = cells.get("natten-mps", {}).get(mode, {}).get("cpu_ms"), cell[mode].get("cpu_ms")
                return f"{base / ours:.1f}x" if base and ours else "-"
            err = cell["fwd"].get("max_err")
            note = "; ".join(sorted({c["error"] for c in cell.values() if c.get("error")}))
            print(f"{shape:<8} {','.join(map(str, LEGACY_SHAPES[shape])):<13} {impl:<13} {fmt('fwd', 'ms', 9)} "
                  f"{fmt('fwd', 'cpu_ms', 8)} {fmt('fwd+bwd', 'ms', 9)} {fmt('fwd+bwd', 'cpu_ms', 8)} "
                  f"{fmt('fwd+bwd', 'peak_mb', 12)} {(f'{err:.1e}' if err is not None else '-'):>8} "
                  f"{ratio('fwd'):>10} {ratio('fwd+bwd'):>10}  {note}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="stage 1 and detection shapes only")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true",
                        help="the legacy NATTEN API (timm_nat.compat) vs natten-mps at NAT-Mini stage shapes (CPU)")
    parser.add_argument("--legacy-cell", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0,
                        help="--legacy: torch threads (0: torch's default; 1 is steadier on a loaded machine)")
    args = parser.parse_args(argv)
    if args.legacy_cell:
        print(json.dumps(measure_legacy(*args.legacy_cell, args.repeats, args.threads)))
        return 0
    if args.legacy:
        return legacy_main(args.repeats, args.timeout, args.threads)
    if args.cell:
        print(json.dumps(measure(*args.cell, args.device, args.repeats)))
        return 0

    import torch
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    shapes = ["stage1", "stage1-d8", "det-half", "det"] if args.quick else list(SHAPES)
    print(f"na2d benchmark: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"head_dim {HEAD_DIM}, kernel {KERNEL}; ours with RPB, natten without")
    header = f"{'shape':<10} {'B,H,W,heads,dil':<18} {'backend':<10} {'fwd ms':>9} {'fwd peak MB':>12} " \
             f"{'fwd+bwd ms':>11} {'f+b peak MB':>12} {'fwd speed-up vs natten':>23}"
    print(header)
    print("-" * len(header))
    results = {}
    for shape in shapes:
        for backend in BACKENDS:
            cells = {}
            for mode in ("fwd", "fwd+bwd"):
                reason = _skip_reason(shape, backend, mode, args.device, total_gb)
                cells[mode] = dict(error=reason) if reason else _run_cell(shape, backend, mode, args.device,
                                                                          args.repeats, args.timeout)
            results[shape, backend] = cells
            base = results.get((shape, "natten"), {}).get("fwd", {})
            ratio = f"{base['ms'] / cells['fwd']['ms']:.1f}x" if "ms" in base and "ms" in cells["fwd"] else "-"

            def fmt(cell, key, width):
                return f"{cell[key]:>{width}.1f}" if key in cell else f"{'-':>{width}}"
            note = "; ".join(sorted({c["error"] for c in cells.values() if c.get("error")}))
            print(f"{shape:<10} {','.join(map(str, SHAPES[shape])):<18} {backend:<10} {fmt(cells['fwd'], 'ms', 9)} "
                  f"{fmt(cells['fwd'], 'peak_mb', 12)} {fmt(cells['fwd+bwd'], 'ms', 11)} "
                  f"{fmt(cells['fwd+bwd'], 'peak_mb', 12)} {ratio:>23}  {note}", flush=True)
    _print_targets(results)
    return 0


def _print_targets(results):
    """The issue's targets, computed from this run's table."""
    def get(shape, backend, mode, key):
        return results.get((shape, backend), {}).get(mode, {}).get(key)
    print("\ntargets (the tiled backend, with RPB; cpu_fused is in timm-nat-benchmark):")
    natten, tiled = get("stage1", "natten", "fwd", "ms"), get("stage1", "tiled", "fwd", "ms")
    if natten and tiled:
        print(f"  stage-1 forward speed-up over NATTEN na2d (no RPB): {natten / tiled:.1f}x  (target >= 50x)")
    half, full = get("det-half", "tiled", "fwd", "peak_mb"), get("det", "tiled", "fwd", "peak_mb")
    if half and full:
        print(f"  peak memory, 200x336 over 100x168: {full / half:.2f}x  (target <= 4.4x)")
    d1, d8 = get("stage1", "tiled", "fwd", "ms"), get("stage1-d8", "tiled", "fwd", "ms")
    if d1 and d8:
        print(f"  dilation 8 over dilation 1 at stage 1, forward: {d8 / d1:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    sys.exit(main())
