"""CIFAR-style ResNets (He et al. 2016, §4.2): 3x3-16 stem, three stages of BasicBlocks 16/32/64, GAP, head.

timm's ResNet class cannot express these (its stem has stride 4 and it has four stages), so this is one
small module reusing ``timm.models.resnet.BasicBlock`` that keeps timm's model contract (``global_pool=''``
returns the feature map, ``forward_intermediates``, TorchScript with BN/NBN, FX;
docs/models.md#models-and-timms-model-contract).
Depth 6n+2: resnet20/32/44/56/110.
Registered names: ``resnet32``, ``resnet32_nbn``, ``resnet32_cbn``, each also with a cosine head
(``_gcl`` suffix), and the same for the other depths.
"""
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock

from ..layers.create_norm import NORMS, create_norm_layer, split_norm_kwargs
from ._builder import (BUILDER_KWARGS, HEADS, check_model_options, check_stem, create_head, model_name, paper_cfg,
                       register_variants, setup_norms)
from .pretrained_tags import check_pretrained, hub_errors, with_pretrained_tags

__all__ = ['CifarResNet', 'CIFAR_DEPTHS']

# blocks per stage: depth = 6n + 2
CIFAR_DEPTHS = {'resnet20': 3, 'resnet32': 5, 'resnet44': 7, 'resnet56': 9, 'resnet110': 18}
SHORTCUTS = ('A', 'B')


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channels (He et al. 2016, CIFAR ResNets).

    No parameters, which is what gives ResNet-32 its 0.46M parameters (the CBN paper's count).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x


class CifarResNet(nn.Module):
    """CIFAR ResNet with a pluggable norm layer and a linear or cosine head; timm model API.

    Args:
        layers: BasicBlocks per each of the three stages (5, 5, 5 for ResNet-32).
        num_classes: classes of the head (0: no head, ``forward`` returns pooled features).
        in_chans: input channels (1 for Fashion-MNIST/digits).
        widths: the three stage widths (16, 32, 64; He et al.).
        shortcut: 'A' zero-pad identity (He et al.; LDAM-DRW/GCL ResNet-32) or 'B' 1x1 conv + norm.
        head: 'linear' or 'cosine' (GCL's normalised classifier).
        cosine_scale: s of the cosine head (30, GCL stage 1).
        global_pool: timm pool type ('avg', He et al.); '' keeps the (N, 64, H/4, W/4) map, as timm's models.
        drop_rate: dropout before the classifier (0, He et al.).
        norm_layer: timm-style ``norm_layer(num_features, device=, dtype=)`` callable.
        zero_init_last: zero the last norm weight of every block, as timm's ResNet (default False, as He et
            al. and the LDAM/GCL code).  Refused with option-A shortcuts that widen a stage: the zero-padded
            shortcut channels plus a zero residual are exactly 0 before the ReLU, whose gradient there is 0,
            so those channels never train (docs/models.md#decision-cifar-initialisation).
        norm_setup: called with the model at the end of construction (before any weight loading),
            e.g. the NBN scope swap of ``lt_zoo.models._builder.setup_norms``.
    Shapes: x (N, in_chans, H, W) -> features (N, 64, H/4, W/4) -> logits (N, num_classes).
    """
    # a constant, not a property or a loop over named_children: TorchScript compiles neither
    stage_names = ('layer1', 'layer2', 'layer3')

    def __init__(
            self,
            layers: Sequence[int] = (5, 5, 5),
            num_classes: int = 10,
            in_chans: int = 3,
            widths: Sequence[int] = (16, 32, 64),
            shortcut: str = 'A',
            head: str = 'linear',
            cosine_scale: float = 30.0,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            norm_layer=nn.BatchNorm2d,
            zero_init_last: bool = False,
            norm_setup: Optional[Callable[[nn.Module], None]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"invalid shortcut {shortcut!r}; expected one of {SHORTCUTS}")
        if head not in HEADS:
            raise ValueError(f"invalid head {head!r}; expected one of {HEADS}")
        check_model_options('CifarResNet', dict(
            num_classes=num_classes, in_chans=in_chans, widths=widths, cosine_scale=cosine_scale,
            global_pool=global_pool, drop_rate=drop_rate, zero_init_last=zero_init_last))
        if not (isinstance(layers, (list, tuple)) and len(layers) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in layers)):
            raise ValueError(f"CifarResNet: invalid layers={layers!r}; expected three positive ints (blocks per stage)")
        if zero_init_last and shortcut == 'A' and any(b > a for a, b in zip(widths, widths[1:])):
            raise ValueError(
                f"CifarResNet: zero_init_last=True with shortcut='A' and widths={tuple(widths)} leaves the padded "
                f"channels dead (zero shortcut + zero residual = 0 at the ReLU, whose gradient there is 0, so they "
                f"never train); use zero_init_last=False (the default, as He et al.) or shortcut='B'")
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.head_type = head
        self.cosine_scale = cosine_scale
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='act1')]
        in_chs, reduction = widths[0], 1
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or in_chs != w:
                    if shortcut == 'A':
                        down = PadShortcut(in_chs, w, s)
                    else:
                        down = nn.Sequential(nn.Conv2d(in_chs, w, 1, stride=s, bias=False, **dd), norm_layer(w, **dd))
                blocks.append(BasicBlock(in_chs, w, stride=s, downsample=down, norm_layer=norm_layer, **dd))
                in_chs = w
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f'layer{i + 1}'))
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = self._create_classifier(num_classes, global_pool, **dd)
        self._init_weights(zero_init_last)
        if norm_setup is not None:
            norm_setup(self)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def _create_classifier(self, num_classes: int, global_pool: str, device=None, dtype=None):
        # flatten only when pooling, as timm's create_classifier: global_pool='' returns the feature map
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        fc = create_head(self.head_type, self.num_features * pool.feat_mult(), num_classes, self.cosine_scale,
                         device=device, dtype=dtype)
        return pool, fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New head of the same type (linear or cosine) for ``num_classes`` classes (0: none)."""
        check_model_options(type(self).__name__, {'num_classes': num_classes, 'global_pool': global_pool})
        p = self.conv1.weight
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        pool, self.fc = self._create_classifier(num_classes, pool_type, device=p.device, dtype=p.dtype)
        if global_pool is not None:
            self.global_pool = pool
        self.fc.train(self.training)

    def _stages(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features after the stem (index 0) and after each stage (1-3), with timm's semantics.

        indices: last n if int, all if None, else these (negative from the end); norm: no final norm here,
        so ignored (as timm's ResNet); stop_early: skip stages after the last wanted one.
        Returns (final features, intermediates), or only the list of (N, C_i, H_i, W_i) intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; expected 'NCHW'")
        take_indices, max_index = feature_take_indices(1 + len(self.stage_names), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self._stages()[:max_index] if stop_early else self._stages()
        for i, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(1 + len(self.stage_names), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so forward_features still runs
        prune_end = max_index < len(self.stage_names)
        if prune_end:  # the features now end at the last kept tap; the head was sized for the last stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self._stages():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': (0.4914, 0.4822, 0.4465), 'std': (0.2023, 0.1994, 0.2010),  # CIFAR-10, as GCL/LDAM code
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


_VARIANTS = [(depth, norm, head) for depth in CIFAR_DEPTHS for norm in NORMS for head in HEADS]

default_cfgs = generate_default_cfgs(with_pretrained_tags({
    model_name(d, n, h): _cfg(**paper_cfg(n, h)) for d, n, h in _VARIANTS
}))

_MODEL_KWARGS = ('num_classes', 'in_chans', 'widths', 'shortcut', 'cosine_scale', 'global_pool', 'drop_rate',
                 'zero_init_last', 'device', 'dtype')


def _create(variant: str, depth: str, norm: str, head: str, /, pretrained: bool = False, **kwargs) -> CifarResNet:
    norm_opts = split_norm_kwargs(norm, kwargs)
    builder_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _MODEL_KWARGS}
    unknown = [k for k in builder_kwargs if k not in BUILDER_KWARGS]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {variant}; valid: {sorted(_MODEL_KWARGS + BUILDER_KWARGS)}"
                         f" plus the norm options of its norm '{norm}'")
    n = CIFAR_DEPTHS[depth]
    if builder_kwargs.get('features_only'):
        builder_kwargs.setdefault('out_indices', (0, 1, 2, 3))  # stem + 3 stages (timm's default assumes 5)
    check_pretrained(variant, pretrained, builder_kwargs)
    with hub_errors(variant, builder_kwargs):
        model = build_model_with_cfg(
            CifarResNet, variant, pretrained,
            layers=(n, n, n), head=head, norm_layer=create_norm_layer(norm, **norm_opts),
            norm_setup=functools.partial(setup_norms, norm=norm, norm_opts=norm_opts, last_stage='layer3'),
            pretrained_filter_fn=check_stem,
            **builder_kwargs, **kwargs)
    return model


register_variants(__name__, [
    (model_name(d, n, h), functools.partial(_create, model_name(d, n, h), d, n, h),
     f"CIFAR ResNet-{d[6:]} with norm '{n}' and head '{h}' (CifarResNet).")
    for d, n, h in _VARIANTS
])
