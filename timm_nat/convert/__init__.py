"""Convert published NAT / DiNAT / DiNAT_s / isotropic checkpoints into verified timm model folders.

A source is a Hugging Face Hub repo id (transformers layout, e.g. ``shi-labs/dinat-mini-in1k-224``),
a local folder (``config.json`` + ``pytorch_model.bin`` / ``model.safetensors``), or an original
``.pth`` (path or URL). The output folder holds what timm's ``local-dir:`` / ``hf-hub:`` loading reads:
timm-named ``model.safetensors``, timm's ``config.json`` (written by ``timm.models.save_for_hf``), a
model card and the converter's manifest. Every conversion is verified: the source through the model
family's ``checkpoint_filter_fn`` and the converted folder through timm's public loading paths must
give identical outputs (max abs diff exactly 0.0), or the command fails.

    timm-nat-convert shi-labs/dinat-mini-in1k-224 -o out/dinat_mini.in1k
    timm-nat-convert nat_tiny_custom.pth -o out/nat --model nat_mini --model-args '{"depths": [2, 2, 6, 2]}'
    timm-nat-convert --all --output-dir out          # every registry entry (exit 3: some only checked offline)

Modules: :mod:`.sources` (sources and downloads), :mod:`.architecture` (which architecture a
checkpoint is; the family table), :mod:`.conversion` (conversion and verification), :mod:`.card`
(the model card), :mod:`.output` (output folders the converter owns), :mod:`.batch` (``--all``),
:mod:`.cli` (the command line).
"""
from .architecture import FAMILIES, Architecture, Family, infer_architecture, timm_nat_architectures
from .batch import convert_all
from .cli import main
from .conversion import Conversion, convert, push_to_hub
from .errors import ConversionError, DownloadError
from .sources import Downloader, Source, read_state_dict, resolve_source

__all__ = [
    'Architecture', 'Conversion', 'ConversionError', 'DownloadError', 'Downloader', 'FAMILIES', 'Family', 'Source',
    'convert', 'convert_all', 'infer_architecture', 'main', 'push_to_hub', 'read_state_dict', 'resolve_source',
    'timm_nat_architectures',
]
