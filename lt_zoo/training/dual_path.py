"""CBN dual-path learning (Cheng et al. ACM MM'22 §3.4; docs/compound_bn.md).

One network, two normalisation paths that share every other weight: the compound path (the mixture,
the only path at test time) and the class-aware split path.  A weak and a strong view of each image go
through both paths.  The paper states: Balanced Softmax on the strong view's prediction (Eq. 20) and a
SimSiam-style consistency with stop-gradient on the target side (Eq. 19).  Which of the four logit
vectors enter each term is not stated; the options of :class:`DualPathLoss` name that choice and
default to: classification on the strong view through both paths, and a symmetric consistency
0.5 [D(c_v, sg(s_v)) + D(s_v, sg(c_v))] between the compound (c) and split (s) logits of every view v,
weighted by 0.1 (the paper's "constants all set to 0.1").

Cost.  A dual-path step runs one network forward (and backward) per (path, view) pair the loss reads,
``DualPathLoss.required_outputs``: with the defaults all four (compound/split x weak/strong), i.e. 4x
the forwards of a single-view step, 2 of them through the split path.  A cost of about 1.33x that of
a plain BN step cannot come from this schedule; it can only describe the per-layer overhead of the
CBN statistics at an equal number of forwards.  Fewer forwards: ``consistency_views: [strong]`` (2
forwards, strong view through both paths) or ``consistency_weight: 0`` with one path (1 forward).
"""
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..layers.compound_bn import frozen_running_stats, split_norm
from ..losses import consistency_loss

__all__ = ['DualPathModel', 'DualPathLoss', 'dual_path_keys']


def dual_path_keys(cls_views: Sequence[str], cls_paths: Sequence[str], consistency_views: Sequence[str],
                   consistency_weight: float):
    """The (path, view) forwards a step needs, as 'path_view' strings (= ``DualPathLoss(...).required_outputs``)."""
    return DualPathLoss(None, cls_views, cls_paths, consistency_views, consistency_weight).required_outputs


class DualPathModel(nn.Module):
    """Wraps a CBN model so that one ``forward`` runs every needed (path, view) pass.

    One forward per backward is what DDP supports; the split path is switched on with
    ``lt_zoo.split_norm`` around the inner calls.  ``keys`` come from the loss
    (``DualPathLoss.required_outputs``), so model and loss cannot disagree on what is computed.
    Shapes: x_weak, x_strong (B, C, H, W), targets (B,) -> {'compound_weak': (B, K), ...};
    ``forward(x)`` alone is the compound path (evaluation) -> (B, K).
    """

    STAT_UPDATES = ('all', 'once')

    def __init__(self, model: nn.Module, num_classes: int, keys: Sequence[str], stat_updates: str = 'all'):
        super().__init__()
        if stat_updates not in self.STAT_UPDATES:
            raise ValueError(f"stat_updates={stat_updates!r}; expected one of {self.STAT_UPDATES}")
        self.model = model
        self.num_classes = num_classes
        self.keys = list(keys)
        # 'once': per path, only one forward updates the CBN running state (the weak view where computed)
        self.updating = set(self.keys)
        if stat_updates == 'once':
            self.updating = set()
            for path in ('compound', 'split'):
                own = [k for k in self.keys if k.startswith(path + '_')]
                if own:
                    self.updating.add(f'{path}_weak' if f'{path}_weak' in own else own[0])

    def _run(self, key: str, views):
        x = views[key.split('_')[1]]
        if key in self.updating:  # the default 'all' takes this path: no per-forward walk over the modules
            return self.model(x)
        with frozen_running_stats(self.model):
            return self.model(x)

    def forward(self, x_weak: torch.Tensor, x_strong: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None):
        if x_strong is None:  # evaluation: the compound path alone, plain logits
            return self.model(x_weak)
        views = {'weak': x_weak, 'strong': x_strong}
        out = {k: self._run(k, views) for k in self.keys if k.startswith('compound_')}
        split_keys = [k for k in self.keys if k.startswith('split_')]
        if split_keys:
            with split_norm(self.model, targets, self.num_classes):
                out.update({k: self._run(k, views) for k in split_keys})
        return out


class DualPathLoss(nn.Module):
    """sum_{(path, view) in cls} L_cls(logits, y) + w * sum_{v} 0.5 [D(c_v, sg(s_v)) + D(s_v, sg(c_v))].

    Args:
        cls_loss: classification loss on logits (Balanced Softmax in the paper, Eq. 20).
        cls_views / cls_paths: which logits get it (default strong view, both paths).
        consistency_views: views whose compound and split logits are pulled together (default both).
        consistency_weight: w (0.1; paper §4.2 "three constants all set to 0.1"); 0 turns the term off.
    Returns a dict of the total and every term (for logging and ablations).
    """

    def __init__(self, cls_loss: Callable, cls_views=('strong',), cls_paths=('compound', 'split'),
                 consistency_views=('weak', 'strong'), consistency_weight: float = 0.1):
        super().__init__()
        self.cls_loss = cls_loss
        self.cls_keys = [f'{p}_{v}' for p in cls_paths for v in cls_views]
        self.consistency_views = list(consistency_views) if consistency_weight > 0 else []
        self.consistency_weight = float(consistency_weight)

    @property
    def required_outputs(self):
        """The 'path_view' logits :meth:`forward` reads, sorted; :class:`DualPathModel` produces exactly these."""
        keys = set(self.cls_keys) | {f'{p}_{v}' for p in ('compound', 'split') for v in self.consistency_views}
        return sorted(keys)

    def forward(self, logits: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        terms = {f'cls_{k}': self.cls_loss(logits[k], targets) for k in self.cls_keys}
        for v in self.consistency_views:
            c, s = logits[f'compound_{v}'], logits[f'split_{v}']
            terms[f'consistency_{v}'] = 0.5 * (consistency_loss(c, s) + consistency_loss(s, c))
        total = sum(terms[f'cls_{k}'] for k in self.cls_keys)
        if self.consistency_views:
            total = total + self.consistency_weight * sum(terms[f'consistency_{v}'] for v in self.consistency_views)
        terms['loss'] = total
        return terms
