"""Export a trained model as a timm checkpoint folder: ``model.safetensors`` + ``config.json``.

The folder loads back with ``timm.create_model('local-dir:' + folder, pretrained=True)`` (after
``import lt_zoo``) and is what ``lt_zoo.hub`` uploads.  Only safetensors are written or read.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from safetensors import safe_open
from timm.models import save_for_hf

from .file_hash import sha256_file as _sha256
from .layers.create_norm import NORM_TABLE, NORMS
from .models._builder import HEADS, model_name
from .models.cifar_resnet import CIFAR_DEPTHS
from .models.imagenet_resnet import IMAGENET_DEPTHS

__all__ = ['export_model', 'load_exported', 'read_export_config', 'plain_architecture', 'fold_nbn_for_export',
           'ExportError', 'WEIGHTS_NAME', 'CONFIG_NAME']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
# config.json key holding the SHA-256 of the model.safetensors written with it: the two files are
# replaced one after the other, so a kill between the renames would pair one export's config with
# another's weights; load_exported detects that pair instead of loading it.
WEIGHTS_HASH_KEY = 'lt_zoo_weights_sha256'


class ExportError(ValueError):
    """An exported folder whose config.json or model.safetensors cannot be read (truncated, corrupt)."""


# lt_zoo name -> (depth, norm, head)
_ARCHS = {model_name(d, n, h): (d, n, h) for d in (*CIFAR_DEPTHS, *IMAGENET_DEPTHS) for n in NORMS for h in HEADS}
# norms that export can fold into plain BN (the norm table's ``fold``): NBN
_FOLDABLE = tuple(n for n, spec in NORM_TABLE.items() if spec.fold is not None)


def plain_architecture(architecture: str) -> str:
    """The plain-BN counterpart of an NBN architecture: timm's own ``resnet50`` for ImageNet depths with a
    linear head, else the lt_zoo BN name (``resnet32_nbn`` -> ``resnet32``, ``resnet50_nbn_gcl`` -> ``resnet50_gcl``).
    """
    if architecture not in _ARCHS or _ARCHS[architecture][1] not in _FOLDABLE:
        nbn = sorted(a for a, (_, n, _h) in _ARCHS.items() if n in _FOLDABLE)
        raise ValueError(f"--fold-nbn needs an NBN architecture (one of {nbn}); got {architecture!r}")
    depth, _, head = _ARCHS[architecture]
    return model_name(depth, 'bn', head)


def fold_nbn_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every NBN layer into plain BN (in place) and rename the model for export.

    ``pretrained_cfg['architecture']`` becomes :func:`plain_architecture` and the NBN options
    (``nbn_scope``) leave the recorded model args, so config.json rebuilds a plain-BN model.
    """
    arch = model.pretrained_cfg['architecture']
    plain = plain_architecture(arch)
    spec = NORM_TABLE[_ARCHS[arch][1]]
    if not any(isinstance(m, spec.layer) for m in model.modules()):
        raise ValueError(f"--fold-nbn: the {arch} model has no {spec.layer.__name__} layer to fold")
    spec.fold(model)
    model.pretrained_cfg = {**model.pretrained_cfg, 'architecture': plain}
    model.default_cfg = model.pretrained_cfg
    drop = set(spec.options)
    model._model_args = {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in drop}
    return model


def export_model(
        model: nn.Module,
        out_dir: str,
        *,
        class_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        fold_nbn: bool = False,
) -> Path:
    """Write ``model.safetensors`` and timm's ``config.json`` into ``out_dir`` (created if needed).

    Both files are written to a temporary folder first and moved into place, so an interrupted
    export never leaves a half-written checkpoint next to a complete one.
    Args:
        class_names: stored as ``label_names`` in config.json.
        data_config: input_size/mean/std/crop_pct/interpolation overriding the registry cfg.
        fold_nbn: replace NBN layers by plain BN first (in place) and export under the plain-BN
            architecture (:func:`fold_nbn_for_export`): timm's own ``resnet50`` for ImageNet depths.
    """
    if not hasattr(model, 'pretrained_cfg'):
        raise ValueError('export_model needs a model created by timm.create_model (it has no pretrained_cfg)')
    if fold_nbn:
        model = fold_nbn_for_export(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_config = {'label_names': list(class_names)} if class_names is not None else None
    with tempfile.TemporaryDirectory(dir=out, prefix='.export-') as tmp:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
        with open(os.path.join(tmp, CONFIG_NAME)) as f:
            cfg = json.load(f)
        cfg[WEIGHTS_HASH_KEY] = _sha256(os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), 'w') as f:
            json.dump(cfg, f, indent=2)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0600; exports are meant to be shared
            os.replace(os.path.join(tmp, name), out / name)
    return out


def read_export_config(folder: str) -> Dict[str, Any]:
    """config.json of an exported folder, with a clear error when the folder is not an export."""
    folder = str(folder)
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        others = [n for n in ('pytorch_model.bin', 'model.pth', 'checkpoint.pth.tar') if
                  os.path.isfile(os.path.join(folder, n))]
        extra = f"; found pickle checkpoint(s) {others}, which lt_zoo refuses to unpickle" if others else ''
        raise FileNotFoundError(f"{folder!r} is not an exported lt_zoo/timm model: missing {missing}{extra}")
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{os.path.join(folder, CONFIG_NAME)} is not valid JSON ({e}): truncated or corrupt; "
                          f"export the model again") from None
    if not isinstance(cfg, dict) or 'architecture' not in cfg:
        raise ValueError(f"{folder}/config.json has no 'architecture' key; it is not a timm model config")
    return cfg


def load_exported(folder: str, **kwargs) -> nn.Module:
    """Create the model of an exported folder with its weights (timm ``local-dir:`` loading).

    Raises ExportError naming the file when config.json or model.safetensors is truncated or corrupt,
    or when the two come from different exports (config.json's ``lt_zoo_weights_sha256``; folders
    exported before that key existed load unchecked).
    """
    import timm
    cfg = read_export_config(folder)
    weights = os.path.join(str(folder), WEIGHTS_NAME)
    try:  # safetensors checks the header against the file size: a truncated file fails here, not inside timm
        with safe_open(weights, framework='pt') as f:
            f.keys()
    except Exception as e:  # SafetensorError, or a header that is not valid JSON/UTF-8
        raise ExportError(f"{weights} is not a readable safetensors file ({e}): truncated or corrupt; "
                          f"export the model again") from None
    if WEIGHTS_HASH_KEY in cfg and _sha256(weights) != cfg[WEIGHTS_HASH_KEY]:
        raise ExportError(f"{weights} is not the file {os.path.join(str(folder), CONFIG_NAME)} was written with "
                          f"(its SHA-256 differs from {WEIGHTS_HASH_KEY}): an interrupted export or a file "
                          f"copied from another export; export the model again")
    return timm.create_model('local-dir:' + os.path.abspath(folder), pretrained=True, **kwargs)
