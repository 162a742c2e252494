"""The network and the loss of a run: a fresh timm model (stage 1) or the stage-1 export (stage 2),
checked against the data, the loss's declared input and the stage before anything is written."""
from typing import Any, Dict, Tuple

import timm
import torch.nn as nn

from ..export import load_exported, read_export_config
from ..layers.compound_bn import CompoundBatchNorm2d
from ..losses import create_loss
from .config import DualPathConfig, LossConfig, ModelConfig, RunConfig, Stage2Config
from .loss_inputs import needs_cosine

__all__ = ['build_model']


def _arch(model: nn.Module) -> str:
    return model.pretrained_cfg.get('architecture')


def build_model(run: RunConfig, cfg: ModelConfig, stage2: Stage2Config, loss: LossConfig, dual: DualPathConfig,
                data: Dict[str, Any]) -> Tuple[nn.Module, nn.Module]:
    """(network, classification loss built from the training class counts)."""
    num_classes = data['splits'].num_classes
    if run.stage == 'stage1':
        if not cfg.model:
            raise ValueError("stage1 needs a model, e.g. --model resnet32 (see timm.list_models('resnet32*'))")
        model = timm.create_model(cfg.model, num_classes=num_classes, in_chans=data['in_chans'], **cfg.model_kwargs)
    else:
        exported = read_export_config(stage2.stage1_dir)
        for key, want in (('num_classes', num_classes), ('in_chans', data['in_chans'])):
            have = exported.get('model_args', {}).get(key, exported.get(key))
            if have is not None and have != want:
                raise ValueError(f"stage-1 checkpoint {stage2.stage1_dir!r} has {key}={have}, but this run's data "
                                 f"needs {key}={want}")
        if cfg.model is not None and cfg.model != exported['architecture']:
            raise ValueError(f"config model {cfg.model!r} does not match the stage-1 architecture "
                             f"{exported['architecture']!r}")
        model = load_exported(stage2.stage1_dir)
    head = model.get_classifier()
    loss_fn = create_loss(loss.loss, data['counts'].tolist(), **loss.loss_kwargs)
    cosine_head = callable(getattr(head, 'cosine', None))
    if needs_cosine(loss_fn) and not cosine_head:
        raise ValueError(f"loss {loss.loss!r} works on cosine similarities and needs a cosine head "
                         f"(a '_gcl' model), but {_arch(model)!r} has {type(head).__name__}")
    if dual.dual_path and not any(isinstance(m, CompoundBatchNorm2d) for m in model.modules()):
        raise ValueError(f"dual_path needs a CBN model (e.g. resnet32_cbn); {_arch(model)!r} has no "
                         f"CompoundBatchNorm2d")
    if run.stage in ('lws', 'tau_norm') and cosine_head:
        raise ValueError(f"stage {run.stage!r} rescales class weights, which a cosine head normalises away")
    return model, loss_fn
