"""The whole GPU check in one call that fits a short device lease: environment, exactness,
training, speed; one compact table last.

    python tools/gpu_check.py                # on a CUDA machine: at most --budget seconds (default 450)
    python tools/gpu_check.py --plan         # anywhere, in seconds: what the real run compiles, and its estimate
    python tools/gpu_check.py --dry-run      # on CPU: every step at tiny sizes (no torch.compile steps)

Steps run in this order; a failed check stops the run with a line saying which (the table is
still printed). Each step has a cost estimate: before it starts, a step that would end past the
budget is skipped and says so, so the call ends in time whatever the compiler costs; every
step's measured seconds are in the table, to correct the estimates.

 1. env: torch / triton / timm versions (timm >= 1.0.21), timm_nat imported from this checkout.
 2. golden op, fp32: flex with RPB on two golden cases (dilation 2; per-axis dilation on a
    rectangle), forward and the four gradients (<= 1e-5 scaled); tiled on all twelve.
 3. golden op, low precision: flex in bf16 and tiled in fp16 on one case (tests/test_cuda.py's bounds).
 4. golden models: logits of one tiny checkpoint per family (<= 1e-4): DiNAT on flex, the CUDA
    default (its maps include NAT's), the other families on tiled.
 5. dinat_mini train step, AMP bf16, flex, against an fp32 step on tiled (loss, gradient directions).
 6. detection backbone: nat_mini features_only forward+backward at 800x1216 and 544x832, AMP
    bf16: peak memory must grow about as the pixels do.
 7. op speed: stage-1 flex+RPB / flex / dense SDPA over the same tokens, bf16, fwd and fwd+bwd
    (batch 128 at 224 px, and the detection backbone's 200x304 stage-1 map).
 8. model speed, eager: nat_mini, dinat_mini, swin_tiny train step img/s, batch 128, AMP bf16.
 9. dinat_mini compiled train step against eager (AMP bf16).
10. model speed, compiled: nat_mini and swin_tiny.
The two torch.compile steps come last although the issue's order puts the compiled train step
with the eager one: a whole-model compile is the costliest cell, and the cells that decide the
targets (flex+RPB / flex, nat_mini / Swin-T eager, detection memory) must run first.

Compiled flex kernels are shared between steps wherever sizes allow (one per map size, kernel,
dilation, dtype, RPB or not, and batch; a second batch size recompiles once): every batch-128
cell sees the 224-pixel stage maps, the detection op cell the detection backbone's stage-1 map,
the op cells' forward times the kernels a training step compiles. ``--plan`` counts them per
step (models run on the meta device, no compute) and prices them with assumed compile times;
the real run rescales the remaining estimates when steps take longer than assumed.

Logs and the table go to ``$OUT`` when it is set (the device tool brings them back), else to
``--log-dir``. Needs no network and installs nothing: the package runs from this checkout.

On a lent device machine whose image may hold an older timm, carry a timm wheel (prepared here:
``echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 -d .whl timm==1.0.31``) and make one call, ``timeout_s`` about 540::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py 2>&1 | tee $OUT/gpu_check.log
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("TIMM_NAT_AUTOREGISTER", "0")  # no import hook here: timm_nat is imported below

import torch  # noqa: E402

from benchmarks.common import median_seconds, peak_tensor_bytes  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
TIMM_FLOOR = (1, 0, 21)
FLEX_FP32_CASES = (6, 11)  # k7 dilation 2; k3 with per-axis dilation (3, 7) on a 9x21 map (the models cover k7 d1)
FLEX_LOW_PRECISION_CASE = 6  # flex in bf16 there; fp16 on tiled (each flex case costs a compile)
FLEX_GOLDEN_FAMILIES = ("dinat_test_tiny",)  # its maps include NAT's (dilation 1); the others run tiled on CUDA
LOW_PRECISION = {torch.bfloat16: (3e-2, 6e-2), torch.float16: (4e-3, 8e-3)}  # as tests/test_cuda.py
FP32_BOUND, MODEL_BOUND = 1e-5, 1e-4
# golden tiny checkpoint -> converter arguments (tests/golden/README: the dilations of the DiNAT ones)
TINY_DILATIONS = json.dumps({"dilations": [[1, 8], [1, 4], [1, 2], [1, 1]]})
GOLDEN_FAMILIES = {
    "nat_test_tiny": ["--model", "nat_mini"],
    "dinat_test_tiny": ["--model", "dinat_mini", "--model-args", TINY_DILATIONS],
    "dinat_s_test_tiny": ["--model", "dinat_s_tiny", "--model-args", TINY_DILATIONS],
    "nat_isotropic_test_tiny": ["--model", "nat_isotropic_small"],
    "dinat_isotropic_test_tiny": ["--model", "dinat_isotropic_small"],
    "vitrpb_test_tiny": [],
}
SWIN = "swin_tiny_patch4_window7_224"
DETECTION_MODEL = "nat_mini"  # 4 flex kernels per image size (dinat_mini: 7)
KERNEL, HEAD_DIM = 7, 32

# Compile-time assumptions behind the estimates (seconds; correct them from a real run's table).
# Guesses, not measurements: no run on a GPU has timed them yet.
FLEX_FORWARD_COMPILE_S = 6.0
FLEX_TRAINING_COMPILE_S = 15.0  # forward and backward kernels
MODEL_COMPILE_S = 90.0  # a whole model's training graph under inductor


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the real run and the CPU dry run."""
    device: str
    batch: int
    image: int
    detection: tuple[tuple[int, int], ...]  # two (height, width) image sizes
    op_maps: tuple[tuple[str, int, int, int], ...]  # (label, batch, height, width), heads 2, dilation 1
    iters: int
    warmup: int
    compile: bool


REAL = Sizes("cuda", 128, 224, ((800, 1216), (544, 832)), (("stage 1, 224px", 128, 56, 56), ("detection stage 1", 1, 200, 304)),
             iters=10, warmup=2, compile=True)
DRY = Sizes("cpu", 2, 64, ((128, 192), (96, 128)), (("dry 14x14", 2, 14, 14),), iters=2, warmup=1, compile=False)


class CheckFailed(Exception):
    """A check's result is wrong: the run stops after this step."""


@dataclasses.dataclass
class Result:
    step: str
    status: str  # ok, FAILED, error, skipped
    seconds: float
    summary: str


def _log(message: str) -> None:
    print(message, flush=True)


# --- timing: the benchmarks' one timer ----------------------------------------------------------

def median_ms(fn: Callable[[], object], device: str, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (benchmarks.common.median_seconds; CUDA synchronised per call)."""
    synchronize = torch.cuda.synchronize if device == "cuda" else None
    return median_seconds(fn, iters, warmup, synchronize=synchronize) * 1e3


# --- checks -----------------------------------------------------------------------------------

def _close(name: str, ours: torch.Tensor, expected: torch.Tensor, bound: float) -> float:
    """Max abs error over max(1, max|expected|); raises CheckFailed above ``bound``."""
    scale = max(1.0, expected.abs().max().item())
    error = (ours.detach().float().cpu() - expected.float().cpu()).abs().max().item() / scale
    if not error <= bound:  # NaN fails too
        raise CheckFailed(f"{name}: scaled max abs diff {error:.3g} > {bound:g}")
    return error


def _golden_op_cases():
    from safetensors import safe_open
    with safe_open(str(GOLDEN / "na2d_legacy.safetensors"), "pt") as f:
        for case in json.loads(f.metadata()["cases"]):
            prefix = f"case{case['case']}."
            yield case, {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _run_golden_case(case, tensors, backend, dtype, device):
    """Output and gradients of one golden case in the golden layout [B, heads, H, W, D]."""
    from timm_nat.attention import na2d
    # copies: on CPU in fp32 .to() would return the golden tensors themselves, and gradients would accumulate
    to_ours = lambda x: x.permute(0, 2, 3, 1, 4).to(device, dtype, copy=True).requires_grad_()  # noqa: E731
    q, k, v = (to_ours(tensors[n]) for n in "qkv")
    rpb = tensors["rpb"].to(device, dtype, copy=True).requires_grad_()
    out = na2d(q, k, v, case["kernel_size"], tuple(case["dilation"]), rpb=rpb, scale=case["scale"], backend=backend)
    out.backward(tensors["grad_out"].permute(0, 2, 3, 1, 4).to(device, dtype))
    golden = lambda x: x.permute(0, 3, 1, 2, 4)  # noqa: E731
    return golden(out), dict(dq=golden(q.grad), dk=golden(k.grad), dv=golden(v.grad), drpb=rpb.grad)


def _flex_or_cpu_backend(sizes: Sizes) -> Optional[str]:
    """flex on CUDA; on the CPU dry run the automatic choice (torch has no CPU flex backward)."""
    return "flex" if sizes.device == "cuda" else None


def step_env(sizes: Sizes, table: dict) -> str:
    import timm
    import timm_nat
    versions = f"torch {torch.__version__}, timm {timm.__version__}"
    try:
        import triton
        versions += f", triton {triton.__version__}"
    except ImportError:
        versions += ", no triton"
    if sizes.device == "cuda":
        versions += f", {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    timm_version = tuple(int(p) for p in timm.__version__.split(".")[:3] if p.isdigit())
    if timm_version < TIMM_FLOOR:
        raise CheckFailed(f"timm {timm.__version__} is older than the floor {'.'.join(map(str, TIMM_FLOOR))}: "
                          "carry a newer wheel (see the device tool's README)")
    package = Path(timm_nat.__file__).resolve().parent
    if package != REPO / "timm_nat":
        raise CheckFailed(f"timm_nat imported from {package}, not from this checkout {REPO}")
    table["versions"] = versions
    return versions


def step_golden_op_fp32(sizes: Sizes, table: dict) -> str:
    worst = {}
    for case, tensors in _golden_op_cases():
        backends = ["tiled"] + (["flex"] if case["case"] in FLEX_FP32_CASES else [])
        if sizes.device != "cuda":
            backends = ["tiled", None]  # the dry run: the CPU default stands in for flex
        for backend in backends:
            out, grads = _run_golden_case(case, tensors, backend, torch.float32, sizes.device)
            label = f"case{case['case']} {backend or 'auto'}"
            errors = [_close(f"{label} out", out, tensors["out"], FP32_BOUND)]
            errors += [_close(f"{label} {name}", grad, tensors[name], FP32_BOUND) for name, grad in grads.items()]
            worst[backend or "auto"] = max(worst.get(backend or "auto", 0.0), *errors)
    return ", ".join(f"{b} max {e:.1e}" for b, e in worst.items()) + f" (bound {FP32_BOUND:g})"


def step_golden_op_low_precision(sizes: Sizes, table: dict) -> str:
    parts = []
    runs = [(torch.bfloat16, _flex_or_cpu_backend(sizes)), (torch.float16, "tiled")]
    for case, tensors in _golden_op_cases():
        if case["case"] != FLEX_LOW_PRECISION_CASE:
            continue
        for dtype, backend in runs:
            forward_bound, grad_bound = LOW_PRECISION[dtype]
            out, grads = _run_golden_case(case, tensors, backend, dtype, sizes.device)
            if out.dtype != dtype:
                raise CheckFailed(f"output dtype {out.dtype}, expected {dtype}")
            errors = [_close(f"{dtype} out", out, tensors["out"], forward_bound)]
            errors += [_close(f"{dtype} {n}", g, tensors[n], grad_bound) for n, g in grads.items()]
            parts.append(f"{str(dtype).removeprefix('torch.')} {backend or 'auto'}: out {errors[0]:.1e}, "
                         f"grads max {max(errors[1:]):.1e}")
    return "; ".join(parts)


def _golden_family_models(device: str):
    """(name, model, golden inputs) of each family's tiny checkpoint, converted as a user would
    (``timm_nat.convert``, then timm's ``local-dir:``)."""
    import timm
    from safetensors.torch import load_file
    from timm_nat.convert import main as convert
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in GOLDEN_FAMILIES.items():
            folder = Path(tmp) / name
            with contextlib.redirect_stdout(sys.stderr):
                status = convert([str(GOLDEN / "orig" / f"{name}.pth"), "-o", str(folder), *args])
            if status != 0:
                raise CheckFailed(f"converting {name} exited {status}")
            model = timm.create_model(f"local-dir:{folder}", pretrained=True).to(device).eval()
            outputs = load_file(GOLDEN / "orig" / f"{name}.golden.safetensors")
            count = sum(key.startswith("input") for key in outputs)
            inputs = [outputs[f"input{j}"].to(device) for j in range(count)]
            yield name, model, inputs, [outputs[f"logits{j}"] for j in range(count)]


def step_golden_models(sizes: Sizes, table: dict) -> str:
    from timm_nat.attention import use_backend
    worst = 0.0
    for name, model, inputs, logits in _golden_family_models(sizes.device):
        backend = _flex_or_cpu_backend(sizes) if name in FLEX_GOLDEN_FAMILIES else "tiled"
        with torch.no_grad(), use_backend(backend):
            for j, (images, expected) in enumerate(zip(inputs, logits)):
                worst = max(worst, _close(f"{name} input{j}", model(images), expected, MODEL_BOUND))
    return (f"{len(GOLDEN_FAMILIES)} families ({', '.join(FLEX_GOLDEN_FAMILIES)} on flex), "
            f"max {worst:.1e} (bound {MODEL_BOUND:g})")


def _batch(sizes: Sizes, classes: int = 10, image: Optional[int] = None):
    gen = torch.Generator().manual_seed(0)
    image = image or sizes.image
    images = torch.randn(sizes.batch, 3, image, image, generator=gen).to(sizes.device)
    return images, torch.randint(0, classes, (sizes.batch,), generator=gen).to(sizes.device)


def _train_step(model, images, labels, amp: bool, device: str):
    with torch.autocast(device, torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach().float()


def _grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_steps(reference_loss, reference, loss, grads, loss_rtol: float, min_cosine: float) -> str:
    if not (torch.isfinite(loss) and abs(loss - reference_loss) <= loss_rtol * abs(reference_loss)):
        raise CheckFailed(f"loss {loss:.5f} vs {reference_loss:.5f} (rtol {loss_rtol})")
    if grads.keys() != reference.keys() or not any("rpb" in n for n in grads):
        raise CheckFailed(f"gradients for {len(grads)} parameters vs {len(reference)}, RPB tables included?")
    cosines = {}
    for name, grad in grads.items():
        if not torch.isfinite(grad).all():
            raise CheckFailed(f"{name}: non-finite gradient")
        cosines[name] = torch.nn.functional.cosine_similarity(grad.flatten(), reference[name].flatten(), dim=0).item()
    worst = min(cosines, key=cosines.get)
    if cosines[worst] < min_cosine:
        raise CheckFailed(f"{worst}: gradient direction {cosines[worst]:.4f} < {min_cosine}")
    return f"loss {loss:.4f} vs {reference_loss:.4f}, min grad cosine {cosines[worst]:.4f} ({worst})"


def _dinat_mini(sizes: Sizes):
    import timm
    torch.manual_seed(0)
    return timm.create_model("dinat_mini", num_classes=10).to(sizes.device).train()


def step_train_bf16(sizes: Sizes, table: dict) -> str:
    from timm_nat.attention import use_backend
    model = _dinat_mini(sizes)
    images, labels = _batch(sizes)
    with use_backend("tiled"):
        reference_loss = _train_step(model, images, labels, amp=False, device=sizes.device)
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    with use_backend(_flex_or_cpu_backend(sizes)):
        loss = _train_step(model, images, labels, amp=True, device=sizes.device)
    return _compare_steps(reference_loss, reference, loss, _grads(model), 2e-2, 0.95)


def step_detection(sizes: Sizes, table: dict) -> str:
    import timm
    torch.manual_seed(0)
    backbone = timm.create_model(DETECTION_MODEL, features_only=True, out_indices=(0, 1, 2, 3)).to(sizes.device)
    peaks = []
    for height, width in sizes.detection:
        images = torch.randn(1, 3, height, width, device=sizes.device)
        maps = []

        def step():
            with torch.autocast(sizes.device, torch.bfloat16):
                maps[:] = backbone(images)
            sum(m.float().mean() for m in maps).backward()

        peak = peak_tensor_bytes(step, sizes.device) / 2**20
        if [tuple(m.shape[-2:]) for m in maps] != [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]:
            raise CheckFailed(f"stage shapes {[tuple(m.shape) for m in maps]} at {height}x{width}")
        if not all(torch.isfinite(m).all() for m in maps):
            raise CheckFailed(f"non-finite features at {height}x{width}")
        if sizes.device == "cuda":
            peaks.append(peak)
        backbone.zero_grad(set_to_none=True)
    if not peaks:
        return "shapes and finiteness checked (peak memory compared on CUDA only)"
    (h0, w0), (h1, w1) = sizes.detection
    growth, pixels = peaks[0] / peaks[1], (h0 * w0) / (h1 * w1)
    table["detection"] = (peaks, growth, pixels)
    if growth > 1.25 * pixels:
        raise CheckFailed(f"peak memory grew {growth:.2f}x for {pixels:.2f}x the pixels (not linear)")
    return (f"peak {peaks[0]:.0f} MiB at {h0}x{w0}, {peaks[1]:.0f} MiB at {h1}x{w1}: "
            f"{growth:.2f}x memory for {pixels:.2f}x pixels")


def _attention_ops(dilation: int):
    from timm_nat.attention import flex
    kernel, dil = (KERNEL, KERNEL), (dilation, dilation)
    return {
        "flex+RPB": lambda q, k, v, rpb: flex.na2d_flex(q, k, v, kernel, dil, rpb, HEAD_DIM ** -0.5),
        "flex": lambda q, k, v, rpb: flex.na2d_flex(q, k, v, kernel, dil, None, HEAD_DIM ** -0.5),
        "SDPA dense": lambda q, k, v, rpb: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }


def step_op_speed(sizes: Sizes, table: dict) -> str:
    rows = []
    for label, batch, height, width in sizes.op_maps:
        gen = torch.Generator().manual_seed(1)
        dtype = torch.bfloat16 if sizes.device == "cuda" else torch.float32
        q, k, v = (torch.randn(batch, height, width, 2, HEAD_DIM, generator=gen).to(sizes.device, dtype) for _ in range(3))
        dense = [x.reshape(batch, height * width, 2, HEAD_DIM).transpose(1, 2).contiguous() for x in (q, k, v)]
        rpb = torch.randn(2, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=gen).to(sizes.device)
        # Inputs need grad in both passes: the forward cell times the same compiled kernel a
        # training step runs (a no-grad forward would be one more compile for each op and map).
        trainable = sizes.device == "cuda"  # torch has no CPU flex backward
        for backward in (False, True) if trainable else (False,):
            cells = {}
            for name, op in _attention_ops(1).items():
                if name == "flex" and label.startswith("detection"):
                    continue  # one more compile; the stage-1 row decides the RPB target
                inputs = [x.detach().requires_grad_(trainable) for x in (dense if name == "SDPA dense" else (q, k, v))]
                bias = rpb.detach().requires_grad_(trainable)
                grad = torch.randn_like(inputs[0])

                def run():
                    out = op(*inputs, bias)
                    if backward:
                        out.backward(grad)

                cells[name] = median_ms(run, sizes.device, sizes.iters, sizes.warmup)
            rows.append((label, "fwd+bwd" if backward else "fwd", cells))
    table["ops"] = rows
    stage1 = [cells for label, passes, cells in rows if passes == "fwd+bwd" and label.startswith("stage 1")]
    if not stage1:
        return "timed (no fwd+bwd on CPU)"
    return f"stage-1 fwd+bwd flex+RPB / flex {stage1[0]['flex+RPB'] / stage1[0]['flex']:.2f}x (target <= 1.3x)"


def _throughput(name: str, sizes: Sizes, compile_: bool) -> float:
    import timm
    torch.manual_seed(0)
    kwargs = dict(img_size=sizes.image) if name == SWIN else {}  # Swin's windows are built for its size
    model = timm.create_model(name, **kwargs).to(sizes.device).train()
    step_model = torch.compile(model) if compile_ else model
    images, labels = _batch(sizes, classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        _train_step(step_model, images, labels, amp=True, device=sizes.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return sizes.batch / median_ms(step, sizes.device, sizes.iters, sizes.warmup) * 1e3


def step_model_speed_eager(sizes: Sizes, table: dict) -> str:
    speeds = table.setdefault("models", {})
    for name in ("nat_mini", "dinat_mini", SWIN):
        speeds[(name, "eager")] = _throughput(name, sizes, compile_=False)
    return f"nat_mini / Swin-T eager {speeds[('nat_mini', 'eager')] / speeds[(SWIN, 'eager')]:.2f}x (img/s)"


def step_train_compiled(sizes: Sizes, table: dict) -> str:
    model = _dinat_mini(sizes)
    images, labels = _batch(sizes)
    eager_loss = _train_step(model, images, labels, amp=True, device=sizes.device)
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled_loss = _train_step(torch.compile(model), images, labels, amp=True, device=sizes.device)
    return _compare_steps(eager_loss, eager, compiled_loss, _grads(model), 1e-2, 0.99)


def step_model_speed_compiled(sizes: Sizes, table: dict) -> str:
    speeds = table.setdefault("models", {})
    for name in ("nat_mini", SWIN):
        speeds[(name, "compiled")] = _throughput(name, sizes, compile_=True)
    return f"nat_mini / Swin-T compiled {speeds[('nat_mini', 'compiled')] / speeds[(SWIN, 'compiled')]:.2f}x (img/s)"


# --- sizing: the flex kernels each step compiles, counted without a GPU -------------------------

# A compiled flex callable: (height, width, kernel, dilation, batch, grad, dtype, rpb).
FlexKey = tuple


def _recorded_flex_keys(calls: Callable[[], None], dtype: str) -> set:
    """The flex keys of every na2d call that ``calls`` makes, run on tiled (meta device or CPU)."""
    from timm_nat.attention import backends, use_backend
    keys, tiled = set(), backends.BACKENDS["tiled"]
    original = tiled.run

    def recording(query, key, value, kernel_size, dilation, rpb, scale):
        b, h, w = query.shape[:3]
        grad = torch.is_grad_enabled() and query.requires_grad
        keys.add((h, w, tuple(kernel_size), tuple(dilation), b, grad, dtype, rpb is not None))
        return original(query, key, value, kernel_size, dilation, rpb, scale)

    tiled.run = recording
    try:
        with use_backend("tiled"):
            calls()
    finally:
        tiled.run = original
    return keys


def _meta_model_keys(name: str, batch: int, image_hw: tuple[int, int], train: bool, dtype: str, **kwargs) -> set:
    """Flex keys of one forward (and backward) of a real-size model, run on the meta device: no compute."""
    def calls():
        import timm
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs).train(train)
            images = torch.empty(batch, 3, *image_hw)
        with torch.set_grad_enabled(train):
            out = model(images)
            if train:
                sum(o.sum() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    return _recorded_flex_keys(calls, dtype)


def _golden_case_keys(cases, dtype: str) -> set:
    return {(c["height"], c["width"], (c["kernel_size"],) * 2, tuple(c["dilation"]), 1, True, dtype, True)
            for c, _ in _golden_op_cases() if c["case"] in cases}


def step_keys(sizes: Sizes) -> dict[str, set]:
    """The flex keys each step uses in the real run (steps without flex: empty)."""
    b, image = sizes.batch, (sizes.image, sizes.image)
    golden_models = set()
    with torch.no_grad():
        for name, model, inputs, _ in _golden_family_models("cpu"):
            if name in FLEX_GOLDEN_FAMILIES:
                golden_models |= _recorded_flex_keys(lambda: model(inputs[0]), "fp32")
    return {
        "golden op fp32": _golden_case_keys(FLEX_FP32_CASES, "fp32"),
        "golden op bf16/fp16": _golden_case_keys((FLEX_LOW_PRECISION_CASE,), "bf16"),
        "golden models": golden_models,
        "dinat_mini train AMP": _meta_model_keys("dinat_mini", b, image, True, "bf16", num_classes=10),
        "detection backbone": set().union(*(_meta_model_keys(DETECTION_MODEL, 1, hw, True, "bf16", features_only=True,
                                                             out_indices=(0, 1, 2, 3)) for hw in sizes.detection)),
        "op speed": {(h, w, (KERNEL, KERNEL), (1, 1), batch, True, "bf16", rpb)
                     for label, batch, h, w in sizes.op_maps for rpb in (True, False)
                     if rpb or not label.startswith("detection")},
        "model speed eager": _meta_model_keys("nat_mini", b, image, True, "bf16")
                             | _meta_model_keys("dinat_mini", b, image, True, "bf16"),
    }


MODEL_COMPILES = {"dinat_mini compiled train": 1, "model speed compiled": 2}


def plan(sizes: Sizes, keys: Optional[dict[str, set]] = None) -> list[tuple[str, int, int, int, float]]:
    """Per step: (name, new flex forward kernels, new flex training kernels, model compiles, estimated s).

    A step pays only for the flex callables that no step before it compiled (the real run keeps
    them). ``keys``: :func:`step_keys` of ``sizes``, if already computed.
    """
    keys, seen, rows = keys or step_keys(sizes), set(), []
    for name, _ in STEPS:
        new = keys.get(name, set()) - seen
        seen |= new
        training = sum(1 for k in new if k[5])
        forward = len(new) - training
        compiles = MODEL_COMPILES.get(name, 0)
        estimate = 5.0 + forward * FLEX_FORWARD_COMPILE_S + training * FLEX_TRAINING_COMPILE_S + compiles * MODEL_COMPILE_S
        rows.append((name, forward, training, compiles, estimate))
    return rows


# --- the run ----------------------------------------------------------------------------------

STEPS = [
    ("env", step_env),
    ("golden op fp32", step_golden_op_fp32),
    ("golden op bf16/fp16", step_golden_op_low_precision),
    ("golden models", step_golden_models),
    ("dinat_mini train AMP", step_train_bf16),
    ("detection backbone", step_detection),
    ("op speed", step_op_speed),
    ("model speed eager", step_model_speed_eager),
    ("dinat_mini compiled train", step_train_compiled),
    ("model speed compiled", step_model_speed_compiled),
]
CHECKS = {"env", "golden op fp32", "golden op bf16/fp16", "golden models", "dinat_mini train AMP",
          "detection backbone", "dinat_mini compiled train"}


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def run(sizes: Sizes, budget: float, estimates: dict) -> tuple[list[Result], dict]:
    results, table, start = [], {}, time.perf_counter()
    stop, slowness, spent = False, 1.0, [0.0, 0.0]  # spent: measured and estimated seconds of the steps run
    for name, step in STEPS:
        elapsed = time.perf_counter() - start
        if stop:
            results.append(Result(name, "skipped", 0.0, "an earlier check failed"))
            continue
        if not sizes.compile and "compiled" in name:
            results.append(Result(name, "skipped", 0.0, "no torch.compile in the dry run"))
            continue
        needs = estimates.get(name, 0.0) * slowness
        if elapsed + needs > budget:
            results.append(Result(name, "skipped", 0.0, f"budget: needs ~{needs:.0f} s, {budget - elapsed:.0f} s left"))
            continue
        _log(f"== {name} ({elapsed:.0f} s elapsed)")
        step_start = time.perf_counter()
        try:
            summary, status = step(sizes, table), "ok"
        except CheckFailed as error:
            summary, status = str(error), "FAILED"
        except Exception as error:  # noqa: BLE001 (the table goes on; the traceback is in the log)
            traceback.print_exc()
            summary, status = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}", "error"
        seconds = time.perf_counter() - step_start
        results.append(Result(name, status, seconds, summary))
        _log(f"   {status} in {seconds:.1f} s: {summary}")
        spent[0] += seconds
        spent[1] += estimates.get(name, 0.0)
        slowness = max(1.0, spent[0] / spent[1]) if spent[1] else 1.0  # compiles slower than assumed: plan for it
        if status != "ok" and name in CHECKS:
            stop = True
            _log(f"gpu_check: check '{name}' {status}; stopping here")
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return results, table


def report(results: list[Result], table: dict, estimates: dict, sizes: Sizes, budget: float) -> str:
    parts = [f"## timm-nat GPU check: {table.get('versions', '?')}", "",
             markdown(["step", "status", "seconds (est.)", "result"],
                      [[r.step, r.status, f"{r.seconds:.0f} ({estimates.get(r.step, 0):.0f})", r.summary] for r in results])]
    if "ops" in table:
        names = ["flex+RPB", "flex", "SDPA dense"]
        ratio = lambda cells, a, b: f"{cells[a] / cells[b]:.2f}x" if a in cells and b in cells else "–"  # noqa: E731
        rows = [[label, passes] + [f"{cells[n]:.3f}" if n in cells else "–" for n in names]
                + [ratio(cells, "flex+RPB", "flex"), ratio(cells, "flex+RPB", "SDPA dense")]
                for label, passes, cells in table["ops"]]
        parts += ["", f"Attention op, heads 2, head_dim {HEAD_DIM}, kernel {KERNEL}, median ms",
                  markdown(["map", "pass"] + [f"{n} ms" for n in names] + ["flex+RPB / flex", "flex+RPB / SDPA"], rows)]
    if "models" in table:
        speeds = table["models"]
        rows = [[name, mode, f"{ips:.3g}",
                 f"{ips / speeds[(SWIN, mode)]:.2f}x" if (SWIN, mode) in speeds else "–"]
                for (name, mode), ips in speeds.items()]
        parts += ["", f"Training step, batch {sizes.batch} at {sizes.image}px, AMP bf16, img/s",
                  markdown(["model", "mode", "img/s", "x Swin-T"], rows)]
    total = sum(r.seconds for r in results)
    parts += ["", f"total {total:.0f} s of a {budget:.0f} s budget"]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no torch.compile steps")
    parser.add_argument("--plan", action="store_true", help="only the sizing of the real run (meta device)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps (default 450)")
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("OUT") or tempfile.gettempdir()) / "gpu_check")
    args = parser.parse_args(argv)
    import timm_nat  # noqa: F401  (registers the models)

    rows = plan(REAL)
    estimates = {name: seconds for name, *_, seconds in rows}
    if args.plan:
        print(markdown(["step", "new flex fwd kernels", "new flex training kernels", "model compiles", "est. s"],
                       [[n, f, t, c, f"{s:.0f}"] for n, f, t, c, s in rows]))
        total = sum(estimates.values())
        print(f"\nestimated {total:.0f} s for the real run; budget {args.budget:.0f} s "
              f"({'fits' if total <= args.budget else 'later steps are skipped'}). Assumed compile seconds: "
              f"flex forward {FLEX_FORWARD_COMPILE_S:g}, flex forward+backward {FLEX_TRAINING_COMPILE_S:g}, "
              f"whole model {MODEL_COMPILE_S:g}")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device (torch.cuda.is_available() is False); use --dry-run or --plan on CPU")
    sizes = DRY if args.dry_run else REAL
    if sizes.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the fp32 bounds
    else:
        estimates = {name: 0.0 for name in estimates}  # the dry run's own cost is not the real one's
    results, table = run(sizes, args.budget, estimates)
    text = report(results, table, estimates, sizes, args.budget)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / "gpu_check.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(r.status in ("ok", "skipped") for r in results) and not any(
        r.status == "skipped" and r.summary == "an earlier check failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
