"""timm-nat models inside frameworks nobody here wrote, with random weights at small sizes:
Hugging Face transformers (TimmBackbone, TimmWrapper), segmentation_models_pytorch (Unet, FPN),
torchvision detection (Faster R-CNN over features_only + FPN), timm's own scripts (train.py,
validate.py, benchmark.py, inference.py, and train.py under torchrun with two CPU processes), and
bf16 autocast training.

The framework packages are optional test dependencies (pyproject extra ``frameworks``); each test
skips, saying so, when its package is absent. timm's scripts are not on PyPI (neither timm's wheel
nor its sdist ships them): those tests run when ``TIMM_SCRIPTS_DIR`` points at a
pytorch-image-models checkout.
"""
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_nat  # noqa: F401  (registers the models)

from conftest import tiny_kwargs

REPO = Path(__file__).resolve().parents[1]
TINY_DINAT = tiny_kwargs("dinat_mini", kernel_size=3)


def _images(*shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# --- Hugging Face transformers --------------------------------------------------------------------

def test_transformers_timm_backbone():
    """``TimmBackbone`` builds dinat_mini by name; its maps are the timm model's ``features_only`` maps."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'frameworks')")
    config = transformers.TimmBackboneConfig(backbone="dinat_mini", use_pretrained_backbone=False, out_indices=(1, 2, 3))
    backbone = transformers.TimmBackbone(config).eval()
    reference = timm.create_model("dinat_mini", features_only=True, out_indices=(1, 2, 3)).eval()
    reference.load_state_dict(backbone._backbone.state_dict())
    images = _images(2, 3, 64, 96)
    with torch.no_grad():
        feature_maps = backbone(images).feature_maps
        expected = reference(images)
    assert backbone.channels == [128, 256, 512]
    assert [tuple(m.shape) for m in feature_maps] == [(2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    for got, want in zip(feature_maps, expected):
        assert torch.equal(got, want)


def test_transformers_timm_wrapper_classification(tmp_path):
    """``TimmWrapperForImageClassification`` from a local config (no Hub): logits and loss are the timm
    model's; ``save_pretrained`` / ``AutoModelForImageClassification.from_pretrained`` round-trips."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'frameworks')")
    config = transformers.TimmWrapperConfig(architecture="dinat_mini", num_labels=5, model_args=TINY_DINAT)
    torch.manual_seed(0)
    model = transformers.TimmWrapperForImageClassification(config).eval()
    images, labels = _images(2, 3, 64, 64), torch.tensor([1, 4])
    with torch.no_grad():
        output = model(pixel_values=images, labels=labels)
        logits = model.timm_model(images)
        pooled = transformers.TimmWrapperModel(config)
        pooled.timm_model.load_state_dict(
            {k: v for k, v in model.timm_model.state_dict().items() if not k.startswith("head.fc.")})
        pooled_output = pooled.eval()(pixel_values=images).pooler_output
        pre_logits = model.timm_model.forward_head(model.timm_model.forward_features(images), pre_logits=True)
    assert torch.equal(output.logits, logits)
    assert torch.allclose(output.loss, F.cross_entropy(logits, labels))
    assert torch.equal(pooled_output, pre_logits)

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "TimmWrapperForImageClassification"
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images).logits, logits)


# --- segmentation_models_pytorch ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_decoders_on_tu_dinat(arch):
    """smp over the ``tu-`` (timm universal) encoder: the real dinat_mini in eval at 224x224 and
    256x320, and a training step on a tiny encoder whose gradients reach every encoder parameter."""
    smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch not installed (extra 'frameworks')")
    model = getattr(smp, arch)("tu-dinat_mini", encoder_weights=None, classes=3).eval()
    assert model.encoder.out_channels[-4:] == [64, 128, 256, 512]
    for size in [(224, 224), (256, 320)]:
        with torch.no_grad():
            masks = model(_images(1, 3, *size))
        assert masks.shape == (1, 3, *size)
        assert torch.isfinite(masks).all()

    tiny = getattr(smp, arch)("tu-dinat_mini", encoder_weights=None, classes=3, **TINY_DINAT).train()
    size = (64, 96)
    target = torch.randint(0, 3, (2, *size), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(tiny(_images(2, 3, *size)), target).backward()
    for name, param in tiny.encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# --- torchvision detection ------------------------------------------------------------------------

class TimmFpnBackbone(nn.Module):
    """timm ``features_only`` stage maps (NCHW, strides 8/16/32) under torchvision's FPN."""

    def __init__(self, name: str, out_channels: int = 32, **kwargs):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), **kwargs)
        self.fpn = FeaturePyramidNetwork(
            self.body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _faster_rcnn(num_classes: int = 3):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = TimmFpnBackbone("dinat_mini", **TINY_DINAT)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
        min_size=128, max_size=192)


def test_torchvision_faster_rcnn_train_and_eval():
    """Faster R-CNN over features_only + FPN: a train step with targets on two images of different
    sizes (every backbone parameter gets a finite gradient), then eval boxes inside each image."""
    model = _faster_rcnn().train()
    images = [_images(3, 120, 160), _images(3, 150, 110)]
    targets = [
        dict(boxes=torch.tensor([[10., 20., 90., 100.], [40., 10., 150., 60.]]), labels=torch.tensor([1, 2])),
        dict(boxes=torch.tensor([[5., 30., 100., 140.]]), labels=torch.tensor([2])),
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, param in model.backbone.body.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for image, detection in zip(images, detections):
        boxes = detection["boxes"]
        assert boxes.shape[1] == 4 and len(detection["scores"]) == len(boxes) == len(detection["labels"])
        height, width = image.shape[1:]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()


# --- bf16 autocast training -----------------------------------------------------------------------

def _train_step_grads(model: nn.Module, images, labels, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, logits.dtype


def test_bf16_autocast_train_step_close_to_fp32():
    """A training step under ``torch.autocast('cpu', torch.bfloat16)`` on a tiny DiNAT: bf16 logits,
    finite loss and fp32 gradients, within bf16 rounding of the fp32 step.

    Bound: bf16 keeps 8 significant bits (unit roundoff 2**-8 ~ 3.9e-3); the linears, the attention
    (SDPA in bf16) and the MLPs each round their inputs and outputs, so loss and gradients drift by
    a few roundoffs: measured 1.1e-4 relative on the loss (a mean over the batch) and 9.4e-3
    relative (L2) on the whole gradient, cosine 0.99999. The test allows 2e-3 (half a roundoff),
    3e-2 (about 8 roundoffs, 3x the measurement) and cosine > 0.999.
    """
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", num_classes=10, **TINY_DINAT).train()
    images, labels = _images(4, 3, 64, 64), torch.arange(4)
    loss32, grads32, dtype32 = _train_step_grads(model, images, labels, autocast=False)
    loss16, grads16, dtype16 = _train_step_grads(model, images, labels, autocast=True)
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)
    assert torch.isfinite(loss16)
    assert abs(loss16 - loss32) / loss32 < 2e-3
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert flat16.dtype == torch.float32 and torch.isfinite(flat16).all()
    assert (flat16 - flat32).norm() / flat32.norm() < 3e-2
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.999
    rpb_grads = [n for n in grads16 if n.endswith(".rpb")]
    assert rpb_grads and all(grads16[n].abs().sum() > 0 for n in rpb_grads)


# --- inference mode, then training (what timm's benchmark.py --bench both does) -------------------

def test_train_step_after_inference_mode_forward():
    """Index plans cached by an inference_mode forward must not be inference tensors (issue 10 #4)."""
    model = timm.create_model("dinat_mini", num_classes=5, **TINY_DINAT)
    images = _images(2, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(images)
    model.train()(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- timm's scripts -------------------------------------------------------------------------------

TIMM_SCRIPTS_DIR = os.environ.get("TIMM_SCRIPTS_DIR")
needs_timm_scripts = pytest.mark.skipif(
    not TIMM_SCRIPTS_DIR,
    reason="timm's train.py / validate.py / benchmark.py / inference.py are not on PyPI (neither wheel nor sdist); "
           "set TIMM_SCRIPTS_DIR to a pytorch-image-models checkout")

# torchrun on CPU: timm's train.py passes device_ids=[cpu] to DDP, which torch rejects for CPU modules
CPU_DDP_LAUNCHER = '''\
"""Run a timm script (e.g. train.py) under torchrun on CPU: drop DDP's device_ids for CPU devices."""
import runpy
import sys

import torch
import torch.nn.parallel


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None  # torch accepts no device_ids for CPU modules
        super().__init__(module, device_ids=device_ids, **kwargs)


torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

MODEL_ARGS = "--model dinat_mini --num-classes 2 --img-size 64 --device cpu"
SCRIPT_COMMANDS = [  # run in order in a directory holding the scripts, cpu_ddp.py and data/{train,val}
    f"python train.py data --val-split val {MODEL_ARGS} -b 2 --epochs 1 --workers 0 --output out --experiment run"
    " --layer-decay 0.75 --grad-checkpointing --model-ema --warmup-epochs 0",
    f"python validate.py data/val {MODEL_ARGS} -b 4 --workers 0 --checkpoint out/run/last.pth.tar",
    f"python validate.py data/val {MODEL_ARGS} -b 4 --workers 0 --checkpoint out/run/last.pth.tar"
    " --amp --amp-dtype bfloat16 --channels-last",
    f"python inference.py data/val {MODEL_ARGS} -b 4 --workers 0 --checkpoint out/run/last.pth.tar --topk 1"
    " --results-dir results",
    "python benchmark.py --model dinat_mini --img-size 64 --device cpu -b 2 --bench infer --num-bench-iter 5",
    "python benchmark.py --model dinat_mini --img-size 64 --device cpu -b 2 --bench train --num-bench-iter 5",
    f"torchrun --nproc_per_node=2 cpu_ddp.py train.py data --val-split val {MODEL_ARGS} -b 2 --epochs 1 --workers 0"
    " --output out --experiment ddp --log-interval 1",
]


def _image_folder(root: Path, images_per_class: int = 4) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(images_per_class):
                pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{label}{i}.png")


@needs_timm_scripts
@pytest.mark.slow
@pytest.mark.timeout(1800)  # seven script runs; each subprocess has 900 s of its own
def test_timm_scripts_unmodified(tmp_path):
    """timm's scripts, unmodified, on a 2-class synthetic ImageFolder (8 train, 8 val images), then
    two-process DDP training under torchrun (gloo) through the CPU launcher."""
    pytest.importorskip("pandas", reason="timm's inference.py imports pandas")
    for script in ("train.py", "validate.py", "benchmark.py", "inference.py"):
        (tmp_path / script).write_text((Path(TIMM_SCRIPTS_DIR) / script).read_text())
    (tmp_path / "cpu_ddp.py").write_text(CPU_DDP_LAUNCHER)
    _image_folder(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    python_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([python_bin, env.get("PATH", "")])
    outputs = []
    for command in SCRIPT_COMMANDS:
        argv = command.split()
        argv[0] = sys.executable if argv[0] == "python" else str(Path(python_bin) / argv[0])
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout + result.stderr)
    train_log, validate_log, validate_amp_log, _, infer_log, bench_train_log, ddp_log = outputs
    assert (tmp_path / "out/run/last.pth.tar").is_file() and (tmp_path / "out/ddp/last.pth.tar").is_file()
    assert '"top1"' in validate_log and '"top1"' in validate_amp_log
    assert len((tmp_path / "results/dinat_mini-64.csv").read_text().strip().splitlines()) == 1 + 8
    assert "infer_samples_per_sec" in infer_log and "train_samples_per_sec" in bench_train_log
    assert "Train: 0 [   1/2" in ddp_log  # 8 images / (2 ranks x batch 2): two steps per rank
