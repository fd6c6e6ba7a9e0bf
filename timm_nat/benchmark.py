"""Whole-model throughput and memory of timm-nat models against timm baselines, one table.

    timm-nat-benchmark [--models nat_mini dinat_mini] [--baselines swin_tiny_patch4_window7_224 convnext_tiny]
                       [--batch-size 8] [--img-size 224] [--device cpu|cuda] [--amp] [--compile]

For every model: inference img/s, training-step img/s (forward, backward, SGD step) and the peak
memory of each (tensor bytes above what was held before the step, see :func:`peak_tensor_bytes`),
measured after warm-up, times as the median of several runs, each cell in a fresh subprocess. GFLOP/img are counted once with ``torch.utils.flop_counter`` (multiply-add = 2
FLOPs; neighborhood attention counted at its nominal kernel*kernel keys per query), and
"GFLOP/s" is that count times img/s. Ratios are against the first baseline.
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


def measure(model_name: str, mode: str, batch_size: int, img_size: int, device: str, amp: bool, compile_: bool,
            repeats: int) -> dict:
    """One cell in this process: ``mode`` is 'infer' or 'train'."""
    import timm
    import torch

    import timm_nat  # noqa: F401

    torch.manual_seed(0)
    kwargs = dict(img_size=img_size) if _takes_img_size(model_name) else {}
    model = timm.create_model(model_name, **kwargs).to(device)
    model.train(mode == "train")
    if compile_:
        model = torch.compile(model)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if mode == "train" else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)

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

    step()  # warm-up (and compilation)
    peak = peak_tensor_bytes(step, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(img_s=batch_size / statistics.median(times), peak_mb=peak / 2**20)


def _run_cell(args, model_name, mode, img_size, batch_size):
    cmd = [sys.executable, "-m", "timm_nat.benchmark", "--cell", model_name, mode, "--img-size", str(img_size),
           "--batch-size", str(batch_size), "--device", args.device, "--repeats", str(args.repeats)]
    cmd += ["--amp"] * args.amp + ["--compile"] * args.compile
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["?"])[-1][:80])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="timm-nat-benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--img-size", type=int, nargs="+", default=[224])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=("infer", "train"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(measure(*args.cell, args.batch_size[0], args.img_size[0], args.device, args.amp,
                                 args.compile, args.repeats)))
        return 0

    import torch
    precision = "bf16 autocast" if args.amp else "fp32"
    print(f"timm-nat benchmark: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{precision}{', torch.compile' if args.compile else ''}; medians of {args.repeats} runs after warm-up")
    header = (f"{'model':<30} {'img':>5} {'batch':>5} {'GFLOP/img':>10} {'infer img/s':>12} {'peak MB':>9} "
              f"{'train img/s':>12} {'peak MB':>9} {'GFLOP/s':>8} {'infer x':>8} {'train x':>8}")
    print(header)
    print("-" * len(header))
    for img_size in args.img_size:
        for batch_size in args.batch_size:
            baseline = None
            for model_name in list(args.baselines) + list(args.models):
                cells = {mode: _run_cell(args, model_name, mode, img_size, batch_size) for mode in args.modes}
                gflops = count_gflops(model_name, img_size)
                baseline = baseline or cells
                print(_row(model_name, img_size, batch_size, gflops, cells, baseline), flush=True)
    if args.baselines:
        print(f"\ninfer x / train x: img/s relative to {args.baselines[0]} at the same size and batch.")
    return 0


def _row(model_name, img_size, batch_size, gflops, cells, baseline) -> str:
    def value(mode, key, fmt):
        cell = cells.get(mode, {})
        return format(cell[key], fmt) if key in cell else cell.get("error", "-")[:12]

    def ratio(mode):
        ours, base = cells.get(mode, {}).get("img_s"), baseline.get(mode, {}).get("img_s")
        return f"{ours / base:.2f}" if ours and base else "-"
    infer = cells.get("infer", {}).get("img_s")
    achieved = f"{gflops * infer:.0f}" if infer else "-"
    return (f"{model_name:<30} {img_size:>5} {batch_size:>5} {gflops:>10.2f} {value('infer', 'img_s', '.1f'):>12} "
            f"{value('infer', 'peak_mb', '.0f'):>9} {value('train', 'img_s', '.1f'):>12} "
            f"{value('train', 'peak_mb', '.0f'):>9} {achieved:>8} {ratio('infer'):>8} {ratio('train'):>8}")


if __name__ == "__main__":
    sys.exit(main())
