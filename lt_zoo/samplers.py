"""Class-aware re-sampling for long-tailed training sets.

Every strategy is the same two-level draw: a class ``j`` with probability ``q_j``, then one of its
``n_j`` training samples uniformly, so the per-sample probability is ``q_j / n_j``. Strategies only
differ in ``q`` (``n`` = training count per class, ``C`` = classes present, ``N = sum n``):

==================  ==============================================  =============================================
name                q_j                                             source
==================  ==============================================  =============================================
``instance``        n_j / N (a plain permutation, no replacement)   ordinary ERM
``class_balanced``  1 / C                                           GCLLoss ``BalancedRS`` (stage 2)
``sqrt``            sqrt(n_j) / sum_k sqrt(n_k)                     square-root sampling (Mahajan et al.)
``power``           n_j^p / sum_k n_k^p (p=1 instance, 0 balanced)  generalises the three above
``effective_num``   prop. to n_j (1-b) / (1-b^n_j)                  GCLLoss ``EffectNumSampler``, b=0.9999
``cben``            as above with b_j = b_a + b_b * delta_hat_j     GCLLoss ``CBEffectNumSampler``, GCL Eq. 13-14
==================  ==============================================  =============================================

Details and the paper settings: docs/losses.md#samplers, docs/gcl.md#decision-gcl-stage-2. This
module also holds the class-count statistics that losses and metrics share
(:func:`validate_class_counts`, :func:`effective_number_weights`, :func:`normalized_log_count_gap`);
it sits at the data stage, so later stages may import it.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from .class_counts import (_as_label_array, class_counts_from_labels, effective_number_weights,
                           normalized_log_count_gap, validate_class_counts)

__all__ = [
    "validate_class_counts",
    "effective_number_weights",
    "normalized_log_count_gap",
    "class_counts_from_labels",
    "ClassWeightedSampler",
    "create_sampler",
    "list_samplers",
]


# ----------------------------------------------------------------------------------------------
# class probabilities per strategy
# ----------------------------------------------------------------------------------------------

def _q_power(n: np.ndarray, power: float = 1.0) -> np.ndarray:
    if not (isinstance(power, numbers.Real) and math.isfinite(power)):
        raise ValueError(f"power must be a finite number; got {power!r}")
    return n ** float(power)


def _q_instance(n: np.ndarray) -> np.ndarray:
    return n.copy()


def _q_class_balanced(n: np.ndarray) -> np.ndarray:
    return np.ones_like(n)


def _q_sqrt(n: np.ndarray) -> np.ndarray:
    return np.sqrt(n)


def _q_effective_num(n: np.ndarray, beta: float = 0.9999) -> np.ndarray:
    """beta=0.9999: GCLLoss ``sampler.py::EffectNumSampler`` and Cui et al."""
    return n * effective_number_weights(n, beta)


def _q_cben(n: np.ndarray, beta_a: float = 0.9999, beta_b: float = 1e-5) -> np.ndarray:
    """beta_a=0.9999, beta_b=1e-5: GCLLoss ``sampler.py::CBEffectNumSampler`` (Li et al. CVPR'22 Eq. 14;
    docs/gcl.md#decision-gcl-stage-2)."""
    beta = beta_a + beta_b * normalized_log_count_gap(n)
    return n * effective_number_weights(n, beta)


_STRATEGIES: Dict[str, Callable[..., np.ndarray]] = {
    "instance": _q_instance,
    "class_balanced": _q_class_balanced,
    "sqrt": _q_sqrt,
    "power": _q_power,
    "effective_num": _q_effective_num,
    "cben": _q_cben,
}


def list_samplers() -> List[str]:
    """Names accepted by :func:`create_sampler`."""
    return sorted(_STRATEGIES)


def _strategy_options(strategy: str) -> List[str]:
    import inspect
    params = list(inspect.signature(_STRATEGIES[strategy]).parameters)
    return params[1:]


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------

class ClassWeightedSampler(Sampler[int]):
    """Draw dataset indices so that class ``j`` is picked with probability ``q_j``.

    ``labels`` (N,) ints; classes absent from ``labels`` get ``q_j = 0``. Each epoch draws
    ``num_samples`` indices (default N) with replacement: a class from ``q`` and then one of its
    samples uniformly. ``strategy='instance'`` instead yields a random permutation (no replacement;
    repeated permutations if ``num_samples > N``). The draw is a pure function of
    ``(seed, epoch)``: call :meth:`set_epoch` every epoch, as with ``DistributedSampler``.

    Distributed use: with plain DDP pass ``num_replicas=world_size, rank=rank``; all ranks make the
    same epoch draw, pad it (by wrapping around) to a multiple of ``num_replicas`` and rank ``r``
    yields positions ``r::num_replicas`` — disjoint shares of equal length.
    With Accelerate keep ``num_replicas=1``: ``accelerator.prepare(DataLoader(ds, sampler=s, ...))``
    shards the *batches* of the identical per-process draw itself, and its ``DataLoaderShard``
    calls ``set_epoch`` with its own iteration counter at the start of each pass.

    Options per strategy (see the module table): ``power`` for 'power', ``beta`` for
    'effective_num', ``beta_a``/``beta_b`` for 'cben'.
    """

    def __init__(self, labels, strategy: str = "instance", seed: int = 0,
                 num_samples: Optional[int] = None, num_replicas: int = 1, rank: int = 0, **opts):
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown sampler {strategy!r}; valid names: {list_samplers()}")
        valid = _strategy_options(strategy)
        unknown = sorted(set(opts) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for sampler {strategy!r}; valid options: {valid}")
        for key, val in (("seed", seed), ("num_replicas", num_replicas), ("rank", rank)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral):
                raise TypeError(f"{key} must be an int; got {val!r}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1; got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}); got {rank}")
        y = _as_label_array(labels)
        if num_samples is None:
            num_samples = len(y)
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")

        counts = np.bincount(y).astype(np.float64)
        present = counts > 0
        q = np.zeros_like(counts)
        q[present] = _STRATEGIES[strategy](counts[present], **opts)
        if not (np.all(np.isfinite(q)) and np.all(q >= 0) and q.sum() > 0):
            raise ValueError(f"sampler {strategy!r} with options {opts} gave invalid class "
                             f"probabilities {q.tolist()[:10]}")
        q = q / q.sum()
        q.setflags(write=False)

        self.strategy = strategy
        self.options = dict(opts)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.class_counts = counts.astype(np.int64)
        self.class_probabilities = q
        # Indices grouped by class: class j owns order[starts[j] : starts[j] + n_j].
        self._order = torch.from_numpy(np.argsort(y, kind="stable"))
        self._starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
        self._counts = torch.from_numpy(counts)
        self._q = torch.tensor(q)
        self._num_total = len(y)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw :meth:`__iter__` yields next."""
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        # SeedSequence mixes (seed, epoch) so that e.g. (0, 1) and (1, 0) give unrelated streams.
        state = np.random.SeedSequence([self.seed % 2**63, self.epoch % 2**63]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)

    def epoch_indices(self) -> torch.Tensor:
        """The full draw of this epoch before sharding, int64 (num_samples,)."""
        g = self._generator()
        if self.strategy == "instance":
            reps = -(-self.num_samples // self._num_total)
            perm = torch.cat([torch.randperm(self._num_total, generator=g) for _ in range(reps)])
            return perm[: self.num_samples]
        classes = torch.multinomial(self._q, self.num_samples, replacement=True, generator=g)
        n = self._counts[classes]
        within = (torch.rand(self.num_samples, generator=g, dtype=torch.float64) * n).long()
        within = torch.minimum(within, n.long() - 1)
        return self._order[self._starts[classes] + within]

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices()
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            if total > len(idx):
                idx = torch.cat([idx, idx.repeat(-(-total // len(idx)))[: total - len(idx)]])
            idx = idx[self.rank: total: self.num_replicas]
        return iter(idx.tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"{type(self).__name__}(strategy={self.strategy!r}{opts}, num_samples={self.num_samples}, "
                f"seed={self.seed}, num_replicas={self.num_replicas}, rank={self.rank})")


def create_sampler(name: str, labels, **opts) -> ClassWeightedSampler:
    """Build a :class:`ClassWeightedSampler` by strategy name (see :func:`list_samplers`).

    ``opts``: ``seed``, ``num_samples``, ``num_replicas``, ``rank`` and the strategy's own options.
    """
    if name not in _STRATEGIES:
        raise ValueError(f"unknown sampler {name!r}; valid names: {list_samplers()}")
    return ClassWeightedSampler(labels, strategy=name, **opts)
