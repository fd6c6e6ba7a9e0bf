"""Whole-model and attention-op speed of timm-nat against timm baselines: two tables, one run.

    timm-nat-benchmark [--models nat_mini dinat_mini] [--baselines swin_tiny_patch4_window7_224 convnext_tiny]
                       [--attention tiled fused] [--precisions fp32 bf16 compile] [--repeats 5]
                       [--skip-models] [--skip-ops] [--device cpu|cuda]

Models: img/s for inference at batch 1 and 8 and a training step (forward, backward, SGD step) at
batch 8, 224x224, for every precision (fp32 eager, bf16 autocast, fp32 ``torch.compile``) and,
for the NA models, every attention route; each cell in a fresh subprocess, the median of
``--repeats`` runs after warm-up; "x" is relative to the first baseline in the same precision.
``--attention fused`` / ``tiled`` force the ``cpu_fused`` / ``tiled`` backend of ``na2d`` on CPU
(:func:`timm_nat.attention.use_backend`); on other devices the operator chooses. GFLOP/img are counted with ``torch.utils.flop_counter``
(multiply-add = 2 FLOPs, neighborhood attention at its nominal kernel*kernel keys per query).

Ops: NAT-Mini's attention layers (head dim 32, kernel 7, with RPB) for every CPU backend, forward
and forward+backward, plus the baseline the kernel is judged against: dense SDPA over 7x7
windows (Swin's: the same 49 keys per query) with a bias that needs no gradient (SDPA's fused
kernels, forward and backward). Peak memory is what tensors hold above the inputs
(:func:`peak_tensor_bytes`). Timings on a shared machine are noisy: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

DEFAULT_MODELS = ("nat_mini", "dinat_mini")
DEFAULT_BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny")
MODEL_CELLS = (("infer", 1), ("infer", 8), ("train", 8))  # (mode, batch)
IMG_SIZE = 224
OP_SHAPES = {  # name: (batch, height, width, heads, dilation); NAT-Mini's stages and two map sizes
    "stage1": (8, 56, 56, 2, 1),
    "stage1-d8": (8, 56, 56, 2, 8),
    "stage2": (8, 28, 28, 4, 1),
    "stage3": (8, 14, 14, 8, 1),
    "stage4": (8, 7, 7, 16, 1),
    "map-640": (1, 160, 160, 2, 1),  # stage 1 of a 640x640 image
    "map-1344": (1, 336, 336, 2, 1),  # and of 1344x1344
}
OP_BACKENDS = ("sdpa-49", "reference", "tiled", "fused")  # the baseline first: ratios need it
HEAD_DIM, KERNEL = 32, 7


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


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: str = "wall") -> float:
    """Median time of ``fn()`` over ``repeats`` calls after ``warmup`` calls: wall time, or with
    ``clock="cpu"`` this process's CPU time (steadier on a shared machine; with one thread it is
    the time the work took when it ran)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = timer()
        fn()
        times.append(timer() - start)
    return statistics.median(times)


def count_gflops(model_name: str, img_size: int) -> float:
    """Forward GFLOP per image at ``img_size`` (NA counted by the reference backend: nominal work)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import timm_nat  # noqa: F401  (registers the models even with the import hook off)
    from timm_nat.attention import use_backend

    model = timm.create_model(model_name, img_size=img_size) if _takes_img_size(model_name) else \
        timm.create_model(model_name)
    with torch.no_grad(), use_backend("reference"), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def _takes_img_size(model_name: str) -> bool:
    return model_name.startswith(("swin", "vit", "vitrpb", "nat_isotropic", "dinat_isotropic"))


def _attention_backend(attention: str, device: str):
    """The ``na2d`` backend an ``--attention`` route forces (None: the operator's own choice)."""
    if device != "cpu":
        return None
    return {"fused": "cpu_fused", "tiled": "tiled"}.get(attention)  # baselines ("-") have no NA


def measure_model(model_name: str, mode: str, batch_size: int, img_size: int, device: str, precision: str,
                  attention: str, repeats: int, clock: str = "wall") -> dict:
    """One model cell in this process: ``mode`` 'infer' or 'train'; returns img/s."""
    import timm
    import torch

    from timm_nat.attention import use_backend

    torch.manual_seed(0)
    kwargs = dict(img_size=img_size) if _takes_img_size(model_name) else {}
    model = timm.create_model(model_name, **kwargs).to(device)
    model.train(mode == "train")
    if precision == "compile":
        model = torch.compile(model)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if mode == "train" else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        if optimizer is None:
            with torch.no_grad(), autocast:
                model(images)
        else:
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    with use_backend(_attention_backend(attention, device)):
        seconds = median_seconds(step, repeats, warmup=2 if precision == "compile" else 1, clock=clock)
    return dict(img_s=batch_size / seconds)


def _op_inputs(shape: str, backend: str, train: bool):
    import torch
    batch, height, width, heads, dilation = OP_SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    if backend == "sdpa-49":  # Swin's windows: [windows, heads, 49, head_dim], bias [heads, 49, 49]
        windows = batch * (height // KERNEL) * (width // KERNEL)
        q, k, v, grad = (torch.randn(windows, heads, KERNEL**2, HEAD_DIM, generator=gen, requires_grad=i < 3 and train)
                         for i in range(4))
        return q, k, v, torch.randn(heads, KERNEL**2, KERNEL**2, generator=gen), grad, dilation
    q, k, v, grad = (torch.randn(batch, height, width, heads, HEAD_DIM, generator=gen, requires_grad=i < 3 and train)
                     for i in range(4))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=gen, requires_grad=train)
    return q, k, v, rpb, grad, dilation


def _op_function(backend: str) -> Callable:
    import torch.nn.functional as F
    if backend == "sdpa-49":
        return lambda q, k, v, bias, dilation: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if backend == "fused":
        from timm_nat.attention.cpu_fused import na2d_cpu_fused as fn
    elif backend == "tiled":
        from timm_nat.attention.tiled import na2d_tiled as fn
    else:
        from timm_nat.attention.reference import na2d_reference as fn
    return lambda q, k, v, rpb, dilation: fn(q, k, v, (KERNEL, KERNEL), (dilation, dilation), rpb, HEAD_DIM ** -0.5)


def _op_skip_reason(shape: str, backend: str) -> str:
    batch, height, width, heads, dilation = OP_SHAPES[shape]
    if backend == "sdpa-49" and (height % KERNEL or width % KERNEL or dilation > 1 or shape.startswith("map")):
        return "n/a"
    if backend == "reference" and shape.startswith("map"):
        return "slow"
    return ""


def measure_op(shape: str, backend: str, repeats: int, clock: str = "wall") -> dict:
    """One op row in this process: fwd and fwd+bwd median ms and the peak extra memory of each."""
    import torch
    row = {}
    attend = _op_function(backend)
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        q, k, v, bias, grad, dilation = _op_inputs(shape, backend, train)

        def call():
            with torch.set_grad_enabled(train):
                out = attend(q, k, v, bias, dilation)
                if train:
                    out.backward(grad)

        row[mode] = median_seconds(call, repeats, clock=clock) * 1e3
        row[mode + " MB"] = peak_tensor_bytes(call, "cpu") / 2**20
    return row


def _run_cells(args, cells: list) -> dict:
    """Runs every cell (a tuple of ``--cell`` arguments) in its own subprocess, ``--jobs`` at a time
    (concurrent cells suit ``--clock cpu``, which counts only each cell's own work)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return dict(zip(cells, pool.map(lambda cell: _run_cell(args, *cell), cells)))


def _run_cell(args, *cell) -> dict:
    cmd = [sys.executable, "-m", "timm_nat.benchmark", "--cell", *map(str, cell), "--device", args.device,
           "--repeats", str(args.repeats), "--clock", args.clock] + ["--threads", str(args.threads)] * bool(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["?"])[-1][:80])
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_table(args) -> dict:
    """Prints the model table; returns {(model, attention, precision, mode, batch): img/s}."""
    print(f"\nmodels, {IMG_SIZE}x{IMG_SIZE}, img/s (x = relative to {args.baselines[0] if args.baselines else '-'} "
          f"in the same precision)")
    cells_header = "".join(f" {f'{mode} b{batch}':>11} {'x':>5}" for mode, batch in MODEL_CELLS)
    header = f"{'model':<30} {'attention':<9} {'precision':<9} {'GFLOP/img':>9}{cells_header}"
    print(header)
    print("-" * len(header))
    results = {}
    rows = [(name, "-") for name in args.baselines] + [(name, a) for name in args.models for a in args.attention]
    cells = _run_cells(args, [("model", name, mode, batch, precision, attention) for precision in args.precisions
                              for name, attention in rows for mode, batch in MODEL_CELLS])
    gflops = {}
    for precision in args.precisions:
        for model_name, attention in rows:
            if model_name not in gflops:
                gflops[model_name] = count_gflops(model_name, IMG_SIZE)
            line = f"{model_name:<30} {attention:<9} {precision:<9} {gflops[model_name]:>9.2f}"
            for mode, batch in MODEL_CELLS:
                cell = cells["model", model_name, mode, batch, precision, attention]
                ours = results[model_name, attention, precision, mode, batch] = cell.get("img_s")
                base = results.get((args.baselines[0], "-", precision, mode, batch)) if args.baselines else None
                ratio = f"{ours / base:.2f}" if ours and base else "-"
                line += f" {ours:>11.2f} {ratio:>5}" if ours else f" {cell.get('error', '-')[:11]:>11} {'-':>5}"
            print(line, flush=True)
    return results


def op_table(args) -> dict:
    """Prints the op table; returns {(shape, backend): row}."""
    print(f"\nattention op, head_dim {HEAD_DIM}, kernel {KERNEL}, fp32, with RPB; ms, and peak MB above the inputs; "
          f"x = relative to sdpa-49 (dense SDPA over Swin's 7x7 windows, bias without grad)")
    header = (f"{'shape':<10} {'B,H,W,heads,dil':<16} {'backend':<10} {'fwd':>8} {'fwd+bwd':>9} {'bwd':>8} "
              f"{'fwd MB':>8} {'f+b MB':>8} {'fwd x':>6} {'bwd x':>6}")
    print(header)
    print("-" * len(header))
    results = {}
    cells = _run_cells(args, [("op", shape, backend) for shape in OP_SHAPES for backend in OP_BACKENDS
                              if not _op_skip_reason(shape, backend)])
    for shape in OP_SHAPES:
        for backend in OP_BACKENDS:
            if _op_skip_reason(shape, backend):
                continue
            row = results[shape, backend] = cells["op", shape, backend]
            if "error" in row:
                print(f"{shape:<10} {','.join(map(str, OP_SHAPES[shape])):<16} {backend:<10} {row['error']}")
                continue
            row["bwd"] = row["fwd+bwd"] - row["fwd"]
            base = results.get((shape, "sdpa-49"), {})

            def ratio(key):
                return f"{row[key] / base[key]:.2f}" if key in base and base is not row else "-"
            print(f"{shape:<10} {','.join(map(str, OP_SHAPES[shape])):<16} {backend:<10} {row['fwd']:>8.1f} "
                  f"{row['fwd+bwd']:>9.1f} {row['bwd']:>8.1f} {row['fwd MB']:>8.1f} {row['fwd+bwd MB']:>8.1f} "
                  f"{ratio('fwd'):>6} {ratio('bwd'):>6}", flush=True)
    return results


def print_targets(models: dict, ops: dict, args) -> None:
    """The issue's targets, computed from this run's tables."""
    print("\ntargets (this run):")
    swin = args.baselines[0] if args.baselines else None
    for attention in args.attention:
        for precision in args.precisions:
            for mode, batch, target in (("infer", 8, 1.5), ("infer", 1, 1.3), ("train", 8, 1.2)):
                if precision == "bf16" and mode == "infer" and batch == 1:
                    target = None  # the issue sets bf16 at batch 8
                ours, base = models.get(("nat_mini", attention, precision, mode, batch)), \
                    models.get((swin, "-", precision, mode, batch))
                if ours and base:
                    goal = f"(target >= {target})" if target else ""
                    print(f"  nat_mini / Swin-T, {attention}, {precision}, {mode} b{batch}: {ours / base:.2f}x {goal}")
            worst = [models.get(("dinat_mini", attention, precision, m, b), 0) /
                     models[("nat_mini", attention, precision, m, b)] for m, b in MODEL_CELLS
                     if models.get(("nat_mini", attention, precision, m, b))]
            if worst:
                print(f"  dinat_mini / nat_mini, {attention}, {precision}, worst cell: {min(worst):.2f}x (target >= 0.95)")
    for backend in ("tiled", "fused"):
        row, base = ops.get(("stage1", backend), {}), ops.get(("stage1", "sdpa-49"), {})
        if "fwd" in row and "fwd" in base:
            print(f"  op stage 1, {backend} / sdpa-49: fwd {row['fwd'] / base['fwd']:.2f}x (target <= 2), "
                  f"bwd {row['bwd'] / base['bwd']:.2f}x (target <= 2.5)")
        small, large = ops.get(("map-640", backend), {}), ops.get(("map-1344", backend), {})
        if "fwd MB" in small and "fwd MB" in large:
            print(f"  op peak memory 1344^2 / 640^2 map, {backend}: fwd {large['fwd MB'] / small['fwd MB']:.2f}x, "
                  f"fwd+bwd {large['fwd+bwd MB'] / small['fwd+bwd MB']:.2f}x (target <= 4.4; pixels 4.41x)")


def main(argv=None) -> int:
    """``timm-nat-benchmark``: print the model and op tables (and the targets) of one run; 0 on success."""
    parser = argparse.ArgumentParser(prog="timm-nat-benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES))
    parser.add_argument("--attention", nargs="+", default=["tiled", "fused"], choices=("tiled", "fused"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "compile"],
                        choices=("fp32", "bf16", "compile"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (each in its own process)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="wall time, or process CPU time (use with --threads 1 on a loaded machine)")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cell:
        kind, *cell = args.cell
        if kind == "op":
            result = measure_op(*cell, args.repeats, args.clock)
        else:
            name, mode, batch, precision, attention = cell
            result = measure_model(name, mode, int(batch), IMG_SIZE, args.device, precision, attention, args.repeats,
                                   args.clock)
        print(json.dumps(result))
        return 0

    print(f"timm-nat benchmark: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; medians of {args.repeats} runs after warm-up, "
          f"{args.clock} clock, {args.jobs} cell(s) at a time", flush=True)
    if "fused" in args.attention:
        from timm_nat.attention import cpu_fused
        print(f"fused CPU kernel: {'available' if cpu_fused.is_available() else 'NOT available'} "
              f"(build/load {cpu_fused.build_seconds() or 0:.1f} s)")
    models = {} if args.skip_models else model_table(args)
    ops = {} if args.skip_ops or args.device != "cpu" else op_table(args)
    print_targets(models, ops, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
