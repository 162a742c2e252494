"""Training data: the (long-tailed) training subset, its class counts, and the two DataLoaders.

Everything data-related the trainer does lives here, behind :func:`build_data` and
:func:`build_loaders`, so that another loader (e.g. a tensor-cached one) can be switched in by one
config key without touching the training loop.  See docs/data.md.
"""
from typing import Any, Dict, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, Sampler

from .. import data as ltdata
from .config import DataConfig

__all__ = ['build_data', 'normalization', 'build_loaders']


def build_data(cfg: DataConfig) -> Dict[str, Any]:
    """Splits -> long-tailed (or balanced) training subset -> labels (N,), counts (C,), channels, LT record."""
    splits = ltdata.load_splits(cfg.dataset, data_dir=cfg.data_dir, data_files=cfg.data_files,
                                image_column=cfg.image_column, label_column=cfg.label_column,
                                train_split=cfg.train_split, test_split=cfg.test_split)
    train, lt = splits.train, None
    if cfg.imbalance_factor > 1 or cfg.balanced_subset:
        train, lt = ltdata.make_long_tailed(splits.train, splits.label_column, cfg.imbalance_factor,
                                            profile=cfg.lt_profile, seed=cfg.lt_seed, selection=cfg.lt_selection)
        if cfg.balanced_subset:  # same total size, every class equal: the upper reference of the benchmark
            per_class = sum(lt.counts) // len(lt.counts)
            train, lt = ltdata.make_long_tailed(splits.train, splits.label_column, 1.0, seed=cfg.lt_seed,
                                                selection=cfg.lt_selection, n_max=per_class)
    labels = ltdata.label_array(train, splits.label_column)
    counts = ltdata.class_counts(labels, splits.num_classes)
    if (counts == 0).any():
        raise ValueError(f"training classes {np.flatnonzero(counts == 0).tolist()} have no images "
                         f"(class counts {counts.tolist()})")
    in_chans = cfg.in_chans or (1 if train[0][splits.image_column].mode in ('L', '1', 'I', 'I;16') else 3)
    lt_record = lt.to_dict() if lt is not None else {'imbalance_factor': 1.0, 'counts': counts.tolist()}
    return dict(splits=splits, train=train, labels=labels, counts=counts, in_chans=in_chans, lt=lt_record)


def normalization(cfg: DataConfig, data: Dict[str, Any], model, fresh_model: bool):
    """(mean, std) per channel: of the training split for a fresh model, else the model's own (stage 2)."""
    if fresh_model and cfg.normalize == 'dataset':
        return ltdata.dataset_mean_std(data['train'], data['splits'].image_column, data['in_chans'])
    return ltdata.mean_std_from_timm(model, data['in_chans'])


def build_loaders(cfg: DataConfig, data: Dict[str, Any], mean: Sequence[float], std: Sequence[float], *,
                  batch_size: int, two_view: bool, sampler: Optional[Sampler], seed: int = 0, rank: int = 0,
                  device=None):
    """(train loader, test loader).  Train batches are (x (B, C, H, W), y (B,)), or ((weak, strong), y)
    with ``two_view`` (the CBN dual path); the test loader keeps the split's order.

    ``data_cache: pil`` gives torch DataLoaders over PIL transforms (Accelerate shards them in ``prepare``);
    ``data_cache: tensors`` gives :class:`lt_zoo.data.TensorLoader` s over images decoded once (the same
    transforms, batched; augmentation seeded by (seed, epoch, rank)).  Those are not passed to
    ``accelerator.prepare``: the sampler shards them itself and every process evaluates the whole test set
    (``full_on_every_rank``), so evaluation gathers nothing.
    """
    kind = 'strong' if cfg.train_aug == 'strong' else 'weak'
    cols = (data['splits'].image_column, data['splits'].label_column)
    if cfg.data_cache == 'tensors':
        common = dict(input_size=cfg.input_size, in_chans=data['in_chans'],
                      cache_dir=ltdata.default_tensor_cache_dir())
        train = ltdata.decode_split(data['train'], *cols, **common)  # the weak view resizes, never centre-crops
        test = ltdata.decode_split(data['splits'].test, *cols, crop_pct=cfg.crop_pct, **common)
        train_tf = ltdata.create_batch_transform(kind, mean=mean, std=std, pad=cfg.pad, hflip=cfg.hflip,
                                                 strong=cfg.strong_aug, train_crop=cfg.train_crop, two_view=two_view)
        train_dl = ltdata.TensorLoader(train.images, train.labels, batch_size=batch_size, sampler=sampler,
                                       transform=train_tf, seed=seed, rank=rank, device=device)
        test_dl = ltdata.TensorLoader(test.images, test.labels, batch_size=max(512, batch_size),
                                      transform=ltdata.create_batch_transform('eval', mean=mean, std=std),
                                      device=device)
        test_dl.full_on_every_rank = True
        return train_dl, test_dl
    common = dict(input_size=cfg.input_size, in_chans=data['in_chans'], mean=mean, std=std)
    aug = dict(pad=cfg.pad, hflip=cfg.hflip, train_crop=cfg.train_crop, **common)
    first = ltdata.create_transform(kind, strong=cfg.strong_aug, **aug)
    train_tf = ltdata.TwoView(first, ltdata.create_transform('strong', strong=cfg.strong_aug, **aug)) \
        if two_view else first
    train_ds = ltdata.attach_transform(data['train'], train_tf, *cols)
    test_ds = ltdata.attach_transform(data['splits'].test,
                                      ltdata.create_transform('eval', crop_pct=cfg.crop_pct, **common), *cols)
    loader = dict(batch_size=batch_size, num_workers=cfg.num_workers, collate_fn=ltdata.collate)
    train_dl = DataLoader(train_ds, sampler=sampler, drop_last=False, **loader)
    test_dl = DataLoader(test_ds, shuffle=False, **loader)
    return train_dl, test_dl
