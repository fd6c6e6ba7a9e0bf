"""GPU benchmark of timm-nat, one run: attention op, flex block masks and whole models.

    python tools/benchmark_gpu.py              # CUDA (tools/gpu_check.sh runs it)
    python tools/benchmark_gpu.py --dry-run    # tiny sizes, few iterations, on CPU: checks it works

Times are medians over ``--iters`` runs after warm-up (and compilation), taken with CUDA events
(``time.perf_counter`` on CPU). Op shapes are the attention layers of nat_mini / dinat_mini at
224 (batch 64; head dim 32, kernel 7) and a detection map (1 x 200 x 336): ``flex`` with RPB
(ours, the CUDA default for the published checkpoints) against flex without RPB, dense SDPA over
the same tokens (flash / cuDNN / efficient kernels: the ceiling of a fused kernel that skips
nothing) and ``natten.na2d`` where NATTEN is installed. Models: nat_mini, dinat_mini against
swin_tiny_patch4_window7_224 and convnext_tiny at batch 128, AMP bf16, eager and torch.compile.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402

import timm_nat  # noqa: E402,F401  (registers the models)
from timm_nat.attention import flex  # noqa: E402

KERNEL, HEAD_DIM = 7, 32
# (label, batch, height, width, heads, dilation)
OP_SHAPES = [("stage 1", 64, 56, 56, 2, 1), ("stage 1 DiNAT", 64, 56, 56, 2, 8), ("stage 2", 64, 28, 28, 4, 1),
             ("stage 2 DiNAT", 64, 28, 28, 4, 4), ("stage 3", 64, 14, 14, 8, 1), ("stage 3 DiNAT", 64, 14, 14, 8, 2),
             ("stage 4", 64, 7, 7, 16, 1), ("detection", 1, 200, 336, 2, 1)]
DRY_OP_SHAPES = [("dry 14x14", 1, 14, 14, 2, 1), ("dry 14x14 dil 2", 1, 14, 14, 2, 2)]
MODELS = ["nat_mini", "dinat_mini", "swin_tiny_patch4_window7_224", "convnext_tiny"]


def median_ms(fn, device: str, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events on the GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _attention_ops(dilation, rpb, scale):
    """name -> callable(q, k, v) on [B, H, W, heads, D] (SDPA and NATTEN need other layouts)."""
    kernel, dil = (KERNEL, KERNEL), (dilation, dilation)
    ops = {
        "flex+RPB": lambda q, k, v: flex.na2d_flex(q, k, v, kernel, dil, rpb, scale),
        "flex": lambda q, k, v: flex.na2d_flex(q, k, v, kernel, dil, None, scale),
        "SDPA dense": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
    }
    try:
        import natten
        ops["natten"] = lambda q, k, v: natten.na2d(q, k, v, kernel_size=KERNEL, dilation=dilation, scale=scale)
    except ImportError:
        pass
    return ops


def op_cell(name, op, shape, dtype, backward, device, iters, warmup):
    """Milliseconds of one (op, shape, dtype, fwd or fwd+bwd), or the reason it did not run."""
    _, batch, height, width, heads, _ = shape
    if backward and device == "cpu" and name.startswith(("flex", "natten")):
        return "no CPU bwd"  # torch has no CPU flex backward (NATTEN runs flex on CPU)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, height, width, heads, HEAD_DIM, device=device, generator=gen, dtype=dtype)
               for _ in range(3))
    if name == "SDPA dense":  # [B, heads, N, D], laid out once: the ceiling is the kernel alone
        q, k, v = (x.reshape(batch, height * width, heads, HEAD_DIM).transpose(1, 2).contiguous() for x in (q, k, v))
    for x in (q, k, v):
        x.requires_grad_(backward)
    grad = torch.randn_like(q)

    def run():
        out = op(q, k, v)
        if backward:
            out.backward(grad)

    try:
        with torch.set_grad_enabled(backward):
            return f"{median_ms(run, device, iters, warmup):.3f}"
    except Exception as error:  # a cell that cannot run says why, the table goes on
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
    finally:
        del q, k, v, grad
        if device == "cuda":
            torch.cuda.empty_cache()


def op_table(shapes, dtypes, device, iters, warmup):
    names = list(_attention_ops(1, None, 1.0))
    header = ["shape (B, HxW, heads, dil)", "dtype", "pass"] + [f"{n} ms" for n in names] + ["RPB cost", "flex+RPB / SDPA"]
    rows = []
    for shape in shapes:
        label, batch, height, width, heads, dilation = shape
        gen = torch.Generator(device=device).manual_seed(1)
        for dtype in dtypes:
            # The model's RPB stays fp32 under autocast; flex adds it to fp32 scores.
            rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, device=device, generator=gen)
            for backward in (False, True):
                rpb.requires_grad_(backward)
                ops = _attention_ops(dilation, rpb, HEAD_DIM ** -0.5)
                cells = {n: op_cell(n, op, shape, dtype, backward, device, iters, warmup) for n, op in ops.items()}
                rows.append([f"{label} ({batch}, {height}x{width}, {heads}, {dilation})", str(dtype).removeprefix("torch."),
                             "fwd+bwd" if backward else "fwd"] + [cells.get(n, "–") for n in names]
                            + [_ratio(cells["flex+RPB"], cells["flex"]), _ratio(cells["flex+RPB"], cells["SDPA dense"])])
    return header, rows


def _ratio(a, b):
    try:
        return f"{float(a) / float(b):.2f}x"
    except ValueError:
        return "–"


def sparsity_table(shapes, device):
    """Non-empty 128x128 blocks of the flex mask (the work it does), raster vs chosen token order."""
    header = ["map, kernel 7, dilation", "raster non-empty", "ours non-empty", "strip", "plan build ms"]
    rows = []
    for label, _, height, width, _, dilation in shapes:
        raster = flex.block_sparsity(flex.flex_plan(height, width, (KERNEL,) * 2, (dilation,) * 2, device, False).block_mask)
        start = time.perf_counter()
        plan = flex._build_plan(height, width, (KERNEL,) * 2, (dilation,) * 2, torch.device(device), True)
        build_ms = (time.perf_counter() - start) * 1e3
        rows.append([f"{label}: {height}x{width}, {dilation}", f"{raster['nonempty']:.3f}",
                     f"{flex.block_sparsity(plan.block_mask)['nonempty']:.3f}", str(plan.strip_width or "raster"),
                     f"{build_ms:.0f}"])
    return header, rows


def model_cell(name, train, compile_, batch, img_size, device, iters, warmup):
    """Images per second of one (model, inference or train step, eager or compiled)."""
    torch.manual_seed(0)
    model = timm.create_model(name).to(device).train(train)
    step_model = torch.compile(model) if compile_ else model
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device, torch.bfloat16)

    def step():
        if not train:
            with torch.no_grad(), autocast:
                step_model(images)
            return
        with autocast:
            loss = torch.nn.functional.cross_entropy(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return batch / median_ms(step, device, iters, warmup) * 1e3
    except Exception as error:
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
    finally:
        del model, step_model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def model_table(models, compiles, batch, img_size, device, iters, warmup):
    header = ["model", "compile", "inference img/s", "x Swin-T", "train step img/s", "x Swin-T"]
    results = {(m, c, t): model_cell(m, t, c, batch, img_size, device, iters, warmup)
               for c in compiles for m in models for t in (False, True)}
    baseline = "swin_tiny_patch4_window7_224"
    rows = []
    for c in compiles:
        for m in models:
            row = [m, "yes" if c else "no"]
            for t in (False, True):
                value, base = results[(m, c, t)], results.get((baseline, c, t))
                row.append(f"{value:.3g}" if isinstance(value, float) else value)
                row.append(f"{value / base:.2f}" if isinstance(value, float) and isinstance(base, float) else "–")
            rows.append(row)
    return header, rows


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, few iterations, CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per cell (default 20; dry run 2)")
    parser.add_argument("--skip-models", action="store_true", help="only the op and block-mask tables")
    parser.add_argument("--no-compile", action="store_true", help="models eager only")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU")
    device = "cpu" if dry else "cuda"
    iters, warmup = args.iters or (2 if dry else 20), 1 if dry else 3
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # how models train
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        machine = f"CPU dry run ({torch.get_num_threads()} threads), torch {torch.__version__}: sizes are not the real ones"
    shapes = DRY_OP_SHAPES if dry else OP_SHAPES
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    tables = [("Attention op, median ms", op_table(shapes, dtypes, device, iters, warmup)),
              ("Flex block mask: share of 128x128 blocks computed", sparsity_table(shapes, device))]
    if not args.skip_models:
        batch, img_size = (1, 224) if dry else (128, 224)
        compiles = [False] if dry or args.no_compile else [False, True]
        models = MODELS[::2] if dry else MODELS  # dry run: one ours, one baseline
        tables.append((f"Models, batch {batch} at {img_size}, AMP bf16"
                       + (" (torch.compile skipped in --dry-run)" if dry else ""),
                       model_table(models, compiles, batch, img_size, device, iters, warmup)))
    print(f"\n## timm-nat GPU benchmark: {machine}\n")
    for title, (header, rows) in tables:
        print(f"### {title}\n\n{markdown(header, rows)}\n")


if __name__ == "__main__":
    main()
