"""The OpenMMLab bridge (``timm_nat.integrations.openmmlab``) and the mmdetection recipe of
docs/mmdetection.md.

The bridge's plain-torch part and its lazy import are tested everywhere; ``TimmNatBackbone``'s
mmengine side where mmengine is installed; the recipe (the page's config built, one training step,
one prediction) where mmdetection and mmcv's compiled ops are, which CI does not build. Each
skip names what is missing.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_nat.integrations import openmmlab
from timm_nat.integrations.openmmlab import TimmNatFeatures

REPO = Path(__file__).resolve().parents[1]
RECIPE_PAGE = REPO / 'docs' / 'mmdetection.md'
OPENMMLAB_PACKAGES = ('mmcv', 'mmdet', 'mmengine', 'mmpretrain', 'mmseg')
HEIGHT, WIDTH = 320, 448  # non-square, a multiple of 32


def _require_mmengine():
    pytest.importorskip('mmengine', reason='mmengine is not installed (docs/mmdetection.md says how)')


def _require_mmdet():
    _require_mmengine()
    pytest.importorskip(
        'mmcv.ops', reason='mmcv with its compiled ops is not installed (docs/mmdetection.md: mmcv 2.1.0, C++20 build)')
    pytest.importorskip('mmdet', reason='mmdetection is not installed (docs/mmdetection.md says how)')


def _frozen_prefixes(frozen_stages: int):
    return ([] if frozen_stages < 0 else ['model.model.patch_embed.']) + \
        [f'model.model.stages.{i}.' for i in range(max(frozen_stages, 0))]


# ----------------------------------------------------------------------------------------------
# the bridge without OpenMMLab
# ----------------------------------------------------------------------------------------------

def test_importing_the_bridge_imports_no_openmmlab_package():
    code = ('import sys, timm_nat.integrations.openmmlab, timm_nat.integrations; '
            f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({OPENMMLAB_PACKAGES!r})))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == '[]'


@pytest.mark.parametrize('register, module, package', [
    ('register_mmdet_backbone', 'mmdet', 'mmdet'),
    ('register_mmseg_backbone', 'mmseg', 'mmsegmentation'),
])
def test_registering_without_the_framework_names_what_to_install(register, module, package, monkeypatch):
    for name in (module, f'{module}.registry'):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError, installed or not
    expected = rf'TimmNatBackbone needs mmengine and {package} \(with mmcv\).*pip install mmengine {package},'
    with pytest.raises(ImportError, match=expected):
        getattr(openmmlab, register)()


@pytest.mark.parametrize('frozen_stages', [-1, 0, 2, 4])
def test_frozen_stages_get_no_gradients(frozen_stages):
    torch.manual_seed(0)
    features = TimmNatFeatures('dinat_mini', frozen_stages=frozen_stages)
    maps = features(torch.randn(1, 3, 64, 96))
    loss = sum(m.square().mean() for m in maps)
    if frozen_stages < 4:  # with all four stages frozen nothing needs a gradient
        loss.backward()
    prefixes = _frozen_prefixes(frozen_stages)
    for name, param in features.named_parameters():
        frozen = name.startswith(tuple(prefixes)) if prefixes else False
        assert param.requires_grad is not frozen, name
        assert (param.grad is None) is frozen, name


def test_frozen_stages_stay_in_eval_mode_and_skip_drop_path():
    torch.manual_seed(0)
    features = TimmNatFeatures('dinat_mini', frozen_stages=2, drop_path_rate=0.5).train()
    net = features.model.model
    assert not net.patch_embed.training and not net.stages[1].training and net.stages[2].training
    x = torch.randn(1, 3, 64, 96)
    first, second = features(x), features(x)  # stages 0 and 1 run in eval mode: no drop path
    torch.testing.assert_close(first[:2], second[:2], rtol=0, atol=0)
    assert not torch.equal(first[3], second[3])  # the trainable stages do drop paths
    torch.testing.assert_close(first[:2], features.eval()(x)[:2], rtol=0, atol=0)


def test_features_are_nchw_stage_maps_of_a_tagged_model():
    features = TimmNatFeatures('dinat_mini.in1k', out_indices=(1, 2, 3))
    maps = features(torch.randn(2, 3, HEIGHT, WIDTH))
    assert isinstance(maps, tuple) and features.channels == [128, 256, 512]
    assert [m.shape for m in maps] == [(2, c, HEIGHT // s, WIDTH // s) for c, s in zip(features.channels, (8, 16, 32))]
    assert features.model.pretrained_cfg['tag'] == 'in1k'


def test_a_detection_tag_builds_its_backbone():
    features = TimmNatFeatures('dinat_tiny.maskrcnn_coco', frozen_stages=1)
    net = features.model.model
    assert features.model.pretrained_cfg['tag'] == 'maskrcnn_coco' and len(net.out_norms) == 4
    assert net.stages[0].blocks[1].attn.dilation == (28, 28)  # the COCO dilations, not ImageNet's
    maps = features(torch.randn(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == features.channels == [64, 128, 256, 512]


@pytest.mark.parametrize('frozen_stages', [-2, 5, 1.0, True, None])
def test_frozen_stages_out_of_range_is_refused(frozen_stages):
    with pytest.raises(ValueError, match=rf'frozen_stages={re.escape(repr(frozen_stages))}: expected an int from -1'):
        TimmNatFeatures('dinat_mini', frozen_stages=frozen_stages)


# ----------------------------------------------------------------------------------------------
# TimmNatBackbone (mmengine)
# ----------------------------------------------------------------------------------------------

def _backbone_class():
    _require_mmengine()
    from mmengine.registry import Registry
    registry = Registry('test models')
    cls = openmmlab.register(registry)
    assert openmmlab.register(registry) is cls and registry.get('TimmNatBackbone') is cls  # idempotent
    return cls


def test_init_weights_keeps_timm_weights_without_init_cfg():
    cls = _backbone_class()
    torch.manual_seed(0)
    backbone = cls('dinat_mini', out_indices=(0, 1))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.init_weights()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_init_cfg_pretrained_loads_a_detector_checkpoints_backbone(tmp_path):
    cls = _backbone_class()
    torch.manual_seed(0)
    source = cls('dinat_mini', out_indices=(0, 1))
    checkpoint = tmp_path / 'detector.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, checkpoint)
    torch.manual_seed(1)
    backbone = cls('dinat_mini', out_indices=(0, 1),
                   init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint), prefix='backbone.'))
    rpb = 'model.model.stages.0.blocks.0.attn.rpb'
    assert not torch.equal(backbone.state_dict()[rpb], source.state_dict()[rpb])
    backbone.init_weights()
    assert backbone.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(source.state_dict()[k], v) for k, v in backbone.state_dict().items())


def test_init_cfg_with_pretrained_is_refused():
    cls = _backbone_class()
    with pytest.raises(ValueError, match=r'pretrained=True .* init_cfg=.*give one of the two'):
        cls('dinat_mini.in1k', pretrained=True, init_cfg=dict(type='Pretrained', checkpoint='x.pth'))


# ----------------------------------------------------------------------------------------------
# the recipe (mmdetection)
# ----------------------------------------------------------------------------------------------

def _recipe_config():
    """The page's Mask R-CNN config, as printed (loading it imports its ``custom_imports``), with tiny
    settings for one CPU step."""
    from mmengine.config import Config
    code = re.search(r'```python\n(# mask_rcnn_dinat_tiny_3x_coco\.py\n.*?)```', RECIPE_PAGE.read_text(), re.S)[1]
    config = Config.fromstring(code, '.py')
    config.model.backbone.pretrained = False  # random weights: nothing downloaded
    config.model.backbone.drop_path_rate = 0.0  # so that every block's parameters get a nonzero gradient
    config.optim_wrapper.type = 'OptimWrapper'  # fp32 on CPU, as the page says
    config.model.train_cfg.rpn_proposal.max_per_img = 200
    config.model.train_cfg.rcnn.sampler.num = 64
    config.model.test_cfg.rpn.max_per_img = 100
    config.model.test_cfg.rcnn.update(score_thr=0.0, max_per_img=10)  # random weights score low
    return config


def _training_sample(generator: torch.Generator):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    num = 3
    corner = torch.rand(num, 2, generator=generator) * torch.tensor([WIDTH - 120, HEIGHT - 120])
    boxes = torch.cat([corner, corner + 40 + torch.rand(num, 2, generator=generator) * 80], dim=1)
    masks = np.zeros((num, HEIGHT, WIDTH), dtype=np.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        mask[y0:y1, x0:x1] = 1
    sample = DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH), scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=boxes, labels=torch.randint(0, 80, (num,), generator=generator), masks=BitmapMasks(masks, HEIGHT, WIDTH))
    return sample


def test_recipe_trains_one_step_and_predicts():
    _require_mmdet()
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper

    config = _recipe_config()  # loading it runs custom_imports, which registers the backbone
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(config.model)
    model.init_weights()
    backbone = model.backbone
    assert type(backbone).__name__ == 'TimmNatBackbone' and backbone.channels == list(config.model.neck.in_channels)
    assert backbone.model.model.stages[0].blocks[1].attn.dilation == (28, 28)  # the config's detection dilations

    # the original settings: no weight decay on rpb and norms, 0.05 on the rest
    optim_wrapper = build_optim_wrapper(model, config.optim_wrapper)
    decay = {id(p): group['weight_decay'] for group in optim_wrapper.optimizer.param_groups for p in group['params']}
    names = [name for name, _ in backbone.named_parameters()]
    assert (len(names), sum('rpb' in n for n in names), sum('norm' in n for n in names)) == (405, 30, 128)
    for name, param in backbone.named_parameters():
        assert decay[id(param)] == (0.0 if 'rpb' in name or 'norm' in name else 0.05), name

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator) for _ in range(2)]
    model.train()
    samples = [_training_sample(generator) for _ in images]
    data = model.data_preprocessor(dict(inputs=images, data_samples=samples), True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    print('one training step:', {k: round(float(v.detach()), 4) for k, v in log_vars.items()})
    assert {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(log_vars)
    assert torch.isfinite(loss) and loss > 0
    optim_wrapper.backward(loss)
    for name, param in backbone.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    before = backbone.model.model.stages[2].blocks[0].attn.rpb.detach().clone()
    optim_wrapper.step()
    assert not torch.equal(before, backbone.model.model.stages[2].blocks[0].attn.rpb)

    model.eval()
    sample = DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH), scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        (result,) = model.test_step(dict(inputs=images[:1], data_samples=[sample]))
    pred = result.pred_instances
    print('prediction:', {k: tuple(v.shape) for k, v in pred.items()})
    assert pred.bboxes.shape == (10, 4) and pred.scores.shape == pred.labels.shape == (10,)
    assert pred.masks.shape == (10, HEIGHT, WIDTH) and pred.masks.dtype == torch.bool
    assert (pred.bboxes[:, 2:] >= pred.bboxes[:, :2]).all() and (pred.bboxes[:, 2] <= WIDTH).all()
