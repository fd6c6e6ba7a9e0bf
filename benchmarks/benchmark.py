"""timm-nat speed and memory, one table per subcommand, every cell in a fresh subprocess.

    python benchmarks/benchmark.py models [--models nat_mini dinat_mini] [--baselines swin_tiny_patch4_window7_224 ...]
                                          [--attention tiled cpu_fused] [--precisions fp32 bf16 compile]
    python benchmarks/benchmark.py profile [--models nat_mini] [--precisions fp32 bf16] [--mode train] [--batch 8]
    python benchmarks/benchmark.py ops    [--shapes stage1 ...] [--backends sdpa-49 reference tiled cpu_fused]
    python benchmarks/benchmark.py legacy [--shapes stage1 ...]        # the legacy NATTEN API (timm_nat.compat)
    common options: [--device cpu|cuda] [--repeats 5] [--threads N] [--clock wall|cpu] [--jobs N]

models: img/s of inference at batch 1 and 8 and of a training step (forward, backward, SGD step) at
batch 8, for every precision (fp32 eager, bf16 autocast, fp32 ``torch.compile``) and, for the NA
models, every forced ``na2d`` backend (``--attention``; ``auto`` lets the operator choose); "x" is
img/s over the baseline model's (the first ``--baselines``) in the same precision and cell. GFLOP/img
are counted with ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs, attention at its nominal
kernel*kernel keys per query).

profile: where the time of one model cell goes (``--mode``, ``--batch``, each precision and ``--attention``):
``torch.profiler`` over ``--repeats`` calls after one warm-up, self time by op, the ``--top`` slowest
and the rest summed, in ms per call and % of the profiled total.

ops: one attention call at the shapes of ``benchmarks.common.SHAPES`` (head dim 32, kernel 7, fp32),
forward, forward+backward and the backward alone (over one kept graph): the ``na2d`` backends
with RPB (``natten`` without: NATTEN has none) and ``sdpa-49``, dense SDPA over Swin's 7x7 windows
(the same 49 keys per query; a bias without gradient, so SDPA runs its fused kernels both ways). "x" is time over the ``--baseline`` backend's
(default sdpa-49) at the same shape. Peak MB is what tensors hold above the inputs.

legacy: ``natten2dqkrpb -> softmax -> natten2dav`` of ``timm_nat.compat``, the fused ``na2d`` that
``compat.NeighborhoodAttention2D`` runs, and natten-mps' pure-PyTorch legacy shim when installed
(``pip install natten-mps``), in the legacy layout [batch, heads, H, W, head_dim], dilation 1; "x" is
natten-mps' CPU time over the row's, and max err the output's distance from the reference backend.

Timings on a shared machine are noisy: compare within one run (``--threads 1 --clock cpu`` counts
only each cell's own work, so cells may run side by side with ``--jobs``).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import CLOCKS, HEAD_DIM, KERNEL, SHAPES, median_seconds, peak_tensor_bytes, ratio, run_cell  # noqa: E402

MODEL_CELLS = (("infer", 1), ("infer", 8), ("train", 8))  # (mode, batch)
DEFAULT_MODELS = ("nat_mini", "dinat_mini")
DEFAULT_BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny")
DEFAULT_OP_SHAPES = ("stage1", "stage1-d8", "stage2", "stage3", "stage4", "map-640", "map-1344")
DEFAULT_LEGACY_SHAPES = ("stage1", "stage2", "stage3", "stage4")
MODEL_ATTENTION = ("auto", "tiled", "cpu_fused", "flex", "natten", "reference")  # na2d backends a model cell can force
OP_BACKENDS = ("sdpa-49", "natten", "reference", "tiled", "cpu_fused", "flex")
LEGACY_IMPLS = {
    "natten-mps": "natten_mps.compat.v014 natten2dqkrpb -> softmax -> natten2dav",
    "compat": "timm_nat.compat natten2dqkrpb -> softmax -> natten2dav",
    "compat-fused": "timm_nat na2d (what compat.NeighborhoodAttention2D runs without attention dropout)",
}


# --- models --------------------------------------------------------------------------------------

def _takes_img_size(model_name: str) -> bool:
    return model_name.startswith(("swin", "vit", "vitrpb", "nat_isotropic", "dinat_isotropic"))


def _create_model(model_name: str, img_size: int):
    import timm

    import timm_nat  # noqa: F401  (registers the models even with the import hook off)
    return timm.create_model(model_name, **(dict(img_size=img_size) if _takes_img_size(model_name) else {}))


def count_gflops(model_name: str, img_size: int) -> float:
    """Forward GFLOP per image at ``img_size`` (attention counted by the reference backend: nominal work)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from timm_nat.attention import use_backend
    model = _create_model(model_name, img_size).eval()
    with torch.no_grad(), use_backend("reference"), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def _model_step(model: str, mode: str, batch: int, img_size: int, device: str, precision: str) -> Callable:
    """One call of a model cell: inference under no_grad, or a training step (forward, backward, SGD)."""
    import torch
    torch.manual_seed(0)
    net = _create_model(model, img_size).to(device).train(mode == "train")
    if precision == "compile":
        net = torch.compile(net)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4) if mode == "train" else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        if optimizer is None:
            with torch.no_grad(), autocast:
                net(images)
            return
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_model(model: str, mode: str, batch: int, img_size: int, device: str, precision: str, attention: str,
                  repeats: int, clock: str = "wall") -> dict:
    """One model cell in this process: ``mode`` 'infer' or 'train'; returns ``{'img_s': ...}``.

    ``attention`` is the ``na2d`` backend forced during the cell ('auto' or '-': the operator's choice)."""
    import torch

    from timm_nat.attention import use_backend
    step = _model_step(model, mode, batch, img_size, device, precision)
    sync = torch.cuda.synchronize if device == "cuda" else None
    with use_backend(None if attention in ("auto", "-") else attention):
        seconds = median_seconds(step, repeats, warmup=2 if precision == "compile" else 1, clock=CLOCKS[clock],
                                 synchronize=sync)
    return dict(img_s=batch / seconds)


def models_table(args) -> dict:
    """Prints the model table; returns {(model, attention, precision, mode, batch): img/s}."""
    baseline = args.baselines[0] if args.baselines else None
    print(f"\nmodels, {args.img_size}x{args.img_size}, img/s; x = img/s over {baseline or '(no baseline)'}'s "
          f"in the same precision and cell")
    header = f"{'model':<30} {'attention':<9} {'precision':<9} {'GFLOP/img':>9}" + "".join(
        f" {f'{mode} b{batch}':>11} {'x':>5}" for mode, batch in MODEL_CELLS)
    print(header + "\n" + "-" * len(header))
    rows = [(name, "-") for name in args.baselines] + [(name, a) for name in args.models for a in args.attention]
    specs = [dict(kind="model", model=name, mode=mode, batch=batch, img_size=args.img_size, device=args.device,
                  precision=precision, attention=attention)
             for precision in args.precisions for name, attention in rows for mode, batch in MODEL_CELLS]
    cells = _run_cells(args, specs)
    results, gflops = {}, {}
    for precision in args.precisions:
        for name, attention in rows:
            if name not in gflops:
                gflops[name] = count_gflops(name, args.img_size)
            line = f"{name:<30} {attention:<9} {precision:<9} {gflops[name]:>9.2f}"
            for mode, batch in MODEL_CELLS:
                cell = cells[_key(dict(kind="model", model=name, mode=mode, batch=batch, img_size=args.img_size,
                                       device=args.device, precision=precision, attention=attention))]
                ours = results[name, attention, precision, mode, batch] = cell.get("img_s")
                base = results.get((baseline, "-", precision, mode, batch))
                line += f" {ours:>11.2f} {ratio(ours, base):>5}" if ours else f" {cell.get('error', '-')[:11]:>11} {'-':>5}"
            print(line, flush=True)
    return results


def profile_model(model: str, mode: str, batch: int, img_size: int, device: str, precision: str, attention: str,
                  repeats: int, top: int) -> dict:
    """Self time by op of one model cell (``torch.profiler`` over ``repeats`` calls after a warm-up):
    ``{'total_ms': per call, 'ops': [[op, ms per call, calls per call], ...] (the top slowest), 'other_ms': ...}``."""
    import torch

    from timm_nat.attention import use_backend
    step = _model_step(model, mode, batch, img_size, device, precision)
    activity = torch.profiler.ProfilerActivity
    activities = [activity.CPU] + ([activity.CUDA] if device == "cuda" else [])
    with use_backend(None if attention in ("auto", "-") else attention):
        step()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
    time_attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = sorted(([event.key, getattr(event, time_attr) / 1e3 / repeats, event.count / repeats]
                  for event in prof.key_averages()), key=lambda op: -op[1])
    total = sum(op[1] for op in ops)
    return dict(total_ms=total, ops=ops[:top], other_ms=total - sum(op[1] for op in ops[:top]))


def profile_table(args) -> dict:
    """Prints where the time of each model cell goes, by op; returns {(model, attention, precision): cell}."""
    rows = [(name, attention) for name in args.models for attention in args.attention]
    specs = [dict(kind="profile", model=name, mode=args.mode, batch=args.batch, img_size=args.img_size,
                  device=args.device, precision=precision, attention=attention, top=args.top)
             for precision in args.precisions for name, attention in rows]
    cells = _run_cells(args, specs)
    results = {}
    for spec in specs:
        cell = results[spec["model"], spec["attention"], spec["precision"]] = cells[_key(spec)]
        print(f"\n{spec['model']}, {args.mode} b{args.batch}, {spec['precision']}, attention {spec['attention']}: "
              + (f"{cell['total_ms']:.1f} ms of self time per call (under the profiler)" if "total_ms" in cell
                 else f"failed: {cell.get('error', '?')}"))
        if "total_ms" not in cell:
            continue
        print(f"{'op':<48} {'ms/call':>9} {'%':>6} {'calls':>7}")
        for name, ms, calls in cell["ops"] + [["(all other ops)", cell["other_ms"], 0]]:
            print(f"{name[:48]:<48} {ms:>9.2f} {100 * ms / cell['total_ms']:>6.1f} {calls or '':>7}")
    return results


# --- ops -----------------------------------------------------------------------------------------

def op_skip_reason(shape: str, backend: str, train: bool, device: str) -> Optional[str]:
    """Why a (shape, backend, pass) cell is not run, or None."""
    batch, height, width, heads, dilation = SHAPES[shape]
    if backend == "sdpa-49" and (height % KERNEL or width % KERNEL or dilation > 1 or batch == 1):
        return "n/a"  # Swin's windows need multiples of 7; a stand-in for the stage shapes only
    if device == "cpu" and backend in ("natten", "flex") and train:
        return "no CPU backward"
    if device == "cpu" and backend in ("natten", "flex") and batch == 1:
        return "N x N on CPU"  # NATTEN 0.20+ on CPU is unfused flex; flex's CPU block mask evaluates N x N
    if backend == "reference" and batch == 1:
        return "slow"
    if backend == "cpu_fused" and device != "cpu":
        return "CPU only"
    return None


def _op_inputs(shape: str, backend: str, train: bool, device: str):
    """(q, k, v, bias, grad) for one cell; sdpa-49 gets Swin's windows [windows, heads, 49, head_dim]."""
    import torch
    batch, height, width, heads, _ = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    if backend == "sdpa-49":
        dims = (batch * (height // KERNEL) * (width // KERNEL), heads, KERNEL**2, HEAD_DIM)
        bias = torch.randn(heads, KERNEL**2, KERNEL**2, device=device, generator=gen)
    else:
        dims = (batch, height, width, heads, HEAD_DIM)
        bias = None if backend == "natten" else torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, device=device,
                                                             generator=gen, requires_grad=train)
    q, k, v, grad = (torch.randn(dims, device=device, generator=gen, requires_grad=i < 3 and train) for i in range(4))
    return q, k, v, bias, grad


def _op_function(backend: str, dilation: int) -> Callable:
    import torch.nn.functional as F

    from timm_nat.attention import na2d
    if backend == "sdpa-49":
        return lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return lambda q, k, v, rpb: na2d(q, k, v, KERNEL, dilation, rpb=rpb, backend=backend)


def measure_op(shape: str, backend: str, device: str, repeats: int, clock: str = "wall") -> dict:
    """One op cell in this process: median ms and peak extra MB of fwd and of fwd+bwd (those that run)."""
    import torch
    attend = _op_function(backend, SHAPES[shape][4])
    sync = torch.cuda.synchronize if device == "cuda" else None
    row = {}
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        if op_skip_reason(shape, backend, train, device):
            continue
        q, k, v, bias, grad = _op_inputs(shape, backend, train, device)

        def call():
            with torch.set_grad_enabled(train):
                out = attend(q, k, v, bias)
                if train:
                    out.backward(grad)

        row[mode] = median_seconds(call, repeats, clock=CLOCKS[clock], synchronize=sync) * 1e3
        row[mode + " MB"] = peak_tensor_bytes(call, device) / 2**20
        if train:  # the backward alone, over one kept graph (fwd+bwd minus an inference fwd would mix kernels)
            out = attend(q, k, v, bias)
            leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
            row["bwd"] = median_seconds(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), repeats,
                                        clock=CLOCKS[clock], synchronize=sync) * 1e3
    return row


def ops_table(args) -> dict:
    """Prints the op table; returns {(shape, backend): row}."""
    print(f"\nattention op, head_dim {HEAD_DIM}, kernel {KERNEL}, fp32, with RPB (natten without); ms, and peak MB "
          f"above the inputs; x = time over {args.baseline}'s at the same shape")
    header = (f"{'shape':<10} {'B,H,W,heads,dil':<16} {'backend':<10} {'fwd':>8} {'fwd+bwd':>9} {'bwd':>8} "
              f"{'fwd MB':>8} {'f+b MB':>8} {'fwd x':>6} {'bwd x':>6}  note")
    print(header + "\n" + "-" * len(header))
    backends = sorted(args.backends, key=lambda b: b != args.baseline)  # the baseline's row first
    specs = {(shape, backend): dict(kind="op", shape=shape, backend=backend, device=args.device)
             for shape in args.shapes for backend in backends
             if not op_skip_reason(shape, backend, False, args.device)}
    cells = _run_cells(args, list(specs.values()))
    results = {}
    for shape in args.shapes:
        for backend in backends:
            if (shape, backend) not in specs:
                continue
            row = results[shape, backend] = cells[_key(specs[shape, backend])]
            dims = ",".join(map(str, SHAPES[shape]))
            if "error" in row:
                print(f"{shape:<10} {dims:<16} {backend:<10} {row['error']}", flush=True)
                continue
            base = results.get((shape, args.baseline), {}) if backend != args.baseline else {}

            def fmt(key, width):
                return f"{row[key]:>{width}.2f}" if key in row else f"{'-':>{width}}"
            note = op_skip_reason(shape, backend, True, args.device) or ""
            print(f"{shape:<10} {dims:<16} {backend:<10} {fmt('fwd', 8)} {fmt('fwd+bwd', 9)} {fmt('bwd', 8)} "
                  f"{fmt('fwd MB', 8)} {fmt('fwd+bwd MB', 8)} {ratio(row.get('fwd'), base.get('fwd')):>6} "
                  f"{ratio(row.get('bwd'), base.get('bwd')):>6}  {note}", flush=True)
    _print_scaling(results, args.backends)
    return results


def _print_scaling(results: dict, backends) -> None:
    """How cost grows within this run: memory with the map (pixels 4.41x) and time with dilation."""
    lines = []
    for backend in backends:
        small, large = results.get(("map-640", backend), {}), results.get(("map-1344", backend), {})
        if "fwd MB" in small and "fwd MB" in large:
            lines.append(f"  {backend}: peak MB at map-1344 over map-640 (4.41x the pixels): fwd "
                         f"{ratio(large['fwd MB'], small['fwd MB'])}x, fwd+bwd {ratio(large.get('fwd+bwd MB'), small.get('fwd+bwd MB'))}x")
        d1, d8 = results.get(("stage1", backend), {}), results.get(("stage1-d8", backend), {})
        if "fwd" in d1 and "fwd" in d8:
            lines.append(f"  {backend}: time at stage1-d8 over stage1 (dilation 8 over 1): fwd {ratio(d8['fwd'], d1['fwd'])}x, "
                         f"fwd+bwd {ratio(d8.get('fwd+bwd'), d1.get('fwd+bwd'))}x")
    if lines:
        print("\nscaling within this run:\n" + "\n".join(lines))


# --- legacy --------------------------------------------------------------------------------------

def _legacy_attention(impl: str) -> Callable:
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


def measure_legacy(shape: str, impl: str, mode: str, repeats: int) -> dict:
    """One legacy cell on CPU in this process: median wall and CPU ms, peak extra MB, and the output's max
    abs difference from timm_nat's reference backend."""
    import time

    import torch

    from timm_nat.attention.reference import na2d_reference
    attention = _legacy_attention(impl)
    batch, height, width, heads, _ = SHAPES[shape]
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
    return dict(ms=median_seconds(call, repeats, clock=time.perf_counter) * 1e3,
                cpu_ms=median_seconds(call, repeats, clock=time.process_time) * 1e3, peak_mb=peak / 2**20, max_err=err)


def legacy_table(args) -> dict:
    """Prints the legacy-API table; returns {(shape, impl, mode): cell}."""
    import importlib.util
    impls = [i for i in LEGACY_IMPLS if i != "natten-mps" or importlib.util.find_spec("natten_mps")]
    print(f"\nlegacy NATTEN API, cpu, fp32, head_dim {HEAD_DIM}, kernel {KERNEL}, dilation 1, with RPB; "
          f"layout [B, heads, H, W, D]")
    for impl in LEGACY_IMPLS:
        print(f"  {impl:<13} {LEGACY_IMPLS[impl]}" + ("" if impl in impls else "  (not installed: rows skipped)"))
    print("  wall / cpu: median wall-clock / process CPU ms; x = natten-mps' cpu ms over the row's")
    header = (f"{'shape':<8} {'B,H,W,heads':<13} {'impl':<13} {'fwd wall':>9} {'fwd cpu':>8} {'f+b wall':>9} "
              f"{'f+b cpu':>8} {'f+b peak MB':>12} {'max err':>8} {'fwd x':>6} {'f+b x':>6}")
    print(header + "\n" + "-" * len(header))
    specs = {(s, i, m): dict(kind="legacy", shape=s, impl=i, mode=m)
             for s in args.shapes for i in impls for m in ("fwd", "fwd+bwd")}
    cells = _run_cells(args, list(specs.values()))
    results = {key: cells[_key(spec)] for key, spec in specs.items()}
    for shape in args.shapes:
        for impl in impls:
            cell = {mode: results[shape, impl, mode] for mode in ("fwd", "fwd+bwd")}

            def fmt(mode, key, width):
                value = cell[mode].get(key)
                return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

            def times_faster(mode):
                return ratio(results.get((shape, "natten-mps", mode), {}).get("cpu_ms"), cell[mode].get("cpu_ms"), 1)
            err = cell["fwd"].get("max_err")
            note = "; ".join(sorted({c["error"] for c in cell.values() if c.get("error")}))
            dims = ",".join(map(str, SHAPES[shape][:4]))
            print(f"{shape:<8} {dims:<13} {impl:<13} {fmt('fwd', 'ms', 9)} {fmt('fwd', 'cpu_ms', 8)} "
                  f"{fmt('fwd+bwd', 'ms', 9)} {fmt('fwd+bwd', 'cpu_ms', 8)} {fmt('fwd+bwd', 'peak_mb', 12)} "
                  f"{(f'{err:.1e}' if err is not None else '-'):>8} {times_faster('fwd'):>6} "
                  f"{times_faster('fwd+bwd'):>6}  {note}", flush=True)
    return results


# --- cells and command line ----------------------------------------------------------------------

def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _run_cells(args, specs: list) -> dict:
    """Runs every cell spec in its own subprocess, ``--jobs`` at a time; {key: result}."""
    def one(spec):
        cell = dict(spec, repeats=args.repeats, clock=args.clock, threads=args.threads)
        return run_cell([sys.executable, str(Path(__file__).resolve()), "cell", json.dumps(cell)], args.timeout)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return dict(zip(map(_key, specs), pool.map(one, specs)))


def run_one_cell(spec: dict) -> dict:
    """Measures one cell spec (what ``_run_cells`` sends) in this process."""
    import torch
    spec = dict(spec)
    kind, threads, clock = spec.pop("kind"), spec.pop("threads", 0), spec.pop("clock", "wall")
    if threads:
        torch.set_num_threads(threads)
    if kind == "model":
        return measure_model(**spec, clock=clock)
    if kind == "op":
        return measure_op(**spec, clock=clock)
    if kind == "profile":
        return profile_model(**spec)  # times with the profiler's own clock
    if kind == "legacy":
        return measure_legacy(**spec)
    raise ValueError(f"unknown cell kind {kind!r}; expected 'model', 'profile', 'op' or 'legacy'")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    common.add_argument("--repeats", type=int, default=5, help="timed calls per cell; the median is shown")
    common.add_argument("--jobs", type=int, default=1, help="cells run at once (each in its own process)")
    common.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: torch's default)")
    common.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or process CPU time (use with --threads 1 on a loaded machine)")
    common.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", parents=[common], help="whole models, img/s")
    models.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    models.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES), help="the first is the x baseline")
    models.add_argument("--attention", nargs="+", default=["tiled", "cpu_fused"], choices=MODEL_ATTENTION,
                        help="na2d backend forced in the NA models (auto: the operator's choice)")
    models.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "compile"],
                        choices=("fp32", "bf16", "compile"))
    models.add_argument("--img-size", type=int, default=224)
    profile = commands.add_parser("profile", parents=[common], help="one model cell's time by op (torch.profiler)")
    profile.add_argument("--models", nargs="+", default=["nat_mini"])
    profile.add_argument("--attention", nargs="+", default=["cpu_fused"], choices=MODEL_ATTENTION,
                         help="na2d backend forced in the NA models (auto: the operator's choice)")
    profile.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16", "compile"))
    profile.add_argument("--mode", default="train", choices=("infer", "train"))
    profile.add_argument("--batch", type=int, default=8)
    profile.add_argument("--img-size", type=int, default=224)
    profile.add_argument("--top", type=int, default=15, help="ops listed; the rest are summed")
    ops = commands.add_parser("ops", parents=[common], help="one attention call, ms and peak MB")
    ops.add_argument("--shapes", nargs="+", default=list(DEFAULT_OP_SHAPES), choices=tuple(SHAPES))
    ops.add_argument("--backends", nargs="+", default=["sdpa-49", "reference", "tiled", "cpu_fused"],
                     choices=OP_BACKENDS)
    ops.add_argument("--baseline", default="sdpa-49", choices=OP_BACKENDS, help="the backend x is relative to")
    legacy = commands.add_parser("legacy", parents=[common], help="the legacy NATTEN API (timm_nat.compat), CPU")
    legacy.add_argument("--shapes", nargs="+", default=list(DEFAULT_LEGACY_SHAPES), choices=tuple(SHAPES))
    cell = commands.add_parser("cell", help=argparse.SUPPRESS)
    cell.add_argument("spec", type=json.loads)
    return parser


def main(argv=None) -> int:
    """Command line: print the table of one subcommand (or measure one cell); 0 on success."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "cell":
        print(json.dumps(run_one_cell(args.spec)))
        return 0
    if args.command == "legacy" and args.device != "cpu":
        parser.error("legacy runs on the CPU only (--device cpu)")
    if args.command == "ops" and args.baseline not in args.backends:
        args.backends = [args.baseline, *args.backends]
    import torch
    print(f"timm-nat benchmark {args.command}: {args.device}, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} thread(s) per cell, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; "
          + (f"profiled over {args.repeats} calls after a warm-up" if args.command == "profile"
             else f"medians of {args.repeats} after warm-up, {args.clock} clock")
          + f", {args.jobs} cell(s) at a time", flush=True)
    if args.device == "cpu" and "cpu_fused" in getattr(args, "attention", getattr(args, "backends", ["cpu_fused"])):
        from timm_nat.attention import cpu_fused
        print(f"fused CPU kernel: {'available' if cpu_fused.is_available() else 'NOT available'} "
              f"(build/load {cpu_fused.build_seconds() or 0:.1f} s)", flush=True)
    {"models": models_table, "profile": profile_table, "ops": ops_table, "legacy": legacy_table}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
