"""Published lt_zoo checkpoints: ``'arch.tag'`` -> pretrained-cfg overrides of the architecture's cfg.

A plain data table, edited by hand when a checkpoint goes to the Hub.  ``python -m lt_zoo.hub card RUN
--repo-id lt-zoo/NAME`` (and ``push``) print the entry of a run, ready to paste here.  Every repo lives
at ``hf_hub_id = 'lt-zoo/<arch>.<tag>'``; timm then loads it with

    import lt_zoo, timm
    model = timm.create_model('resnet32_cbn.fmnist_lt', pretrained=True)

Tag loading builds the model from the entrypoint's default options plus the cfg's num_classes and
in_chans (``input_size[0]``); a checkpoint trained with other model options (e.g. ``num_components``)
must be loaded with ``hf-hub:`` instead, which reads them from config.json ``model_args``.

Why ``with_pretrained_tags`` reorders: ``timm.models.generate_default_cfgs`` makes the first tag *with
weights* the architecture's default, and the default cfg's num_classes/in_chans become constructor
defaults, so ``timm.create_model('resnet32_cbn')`` would silently turn into a 1-channel, 10-class model.
The untrained cfg is therefore re-keyed ``'arch.*'`` (timm: "a tag ending in '*' marks the default")
and placed after the published tags (a ``*`` key placed first would lose its place to the first tag
with weights; timm/models/_registry.py ``generate_default_cfgs``).
"""
from typing import Any, Dict

__all__ = ['HF_ORG', 'PRETRAINED_TAGS', 'SOURCE_RUNS', 'with_pretrained_tags']

HF_ORG = 'lt-zoo'

# Label order 0..9 of Zalando's Fashion-MNIST README (= lt_zoo.data.FASHION_MNIST_CLASSES, checked by a test).
_FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')

# Fashion-MNIST-LT benchmark (train/configs/fmnist_lt/_base.yaml): IF 100, exp profile, cao2019 selection,
# seed 0 -> 14,886 training images (indices hash 52323999b1542c91), 28x28x1.  mean/std: the training split's
# (lt_zoo.data.dataset_mean_std, normalize: dataset), which every benchmark run records in its config.json
# pretrained_cfg; stage-2 runs inherit them from stage 1.  Replace with the printed entry if they differ.
_FMNIST_LT = dict(
    num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7), crop_pct=1.0, interpolation='bilinear',
    mean=(0.2979101838236302,), std=(0.3550707124808394,), label_names=_FASHION_MNIST_LABELS,
    license='apache-2.0', origin_url='https://github.com/zalandoresearch/fashion-mnist',
)
_RESNET = dict(paper_name='Deep Residual Learning for Image Recognition', paper_ids='arXiv:1512.03385')
_BS = dict(paper_name='Balanced Meta-Softmax for Long-Tailed Visual Recognition', paper_ids='arXiv:2007.10740')
_LDAM = dict(paper_name='Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss',
             paper_ids='arXiv:1906.07413')
_GCL = dict(paper_name='Long-tailed Visual Recognition via Gaussian Clouded Logit Adjustment',
            paper_ids='arXiv:2305.11733')
_NBN = dict(paper_name='Normalizing Batch Normalization for Long-Tailed Recognition', paper_ids='arXiv:2501.03122')
_CBN = dict(paper_name='Compound Batch Normalization for Long-tailed Image Classification',
            paper_ids='arXiv:2212.01007')
_FSA = dict(paper_name='Feature Space Augmentation for Long-Tailed Data', paper_ids='arXiv:2008.03673')


def _tag(name: str, description: str, paper: Dict[str, str], **overrides) -> Dict[str, Any]:
    return dict(_FMNIST_LT, hf_hub_id=f'{HF_ORG}/{name}', description=description, **paper, **overrides)


PRETRAINED_TAGS: Dict[str, Dict[str, Any]] = {
    'resnet32.fmnist_lt': _tag(
        'resnet32.fmnist_lt', 'ResNet-32, cross-entropy, Fashion-MNIST-LT (IF 100)', _RESNET),
    'resnet32.fmnist_lt_bs': _tag(
        'resnet32.fmnist_lt_bs', 'ResNet-32, Balanced Softmax, Fashion-MNIST-LT (IF 100)', _BS),
    'resnet32_gcl.fmnist_lt_ldam': _tag(
        'resnet32_gcl.fmnist_lt_ldam', 'ResNet-32 cosine head, LDAM-DRW, Fashion-MNIST-LT (IF 100)', _LDAM),
    'resnet32_gcl.fmnist_lt': _tag(
        'resnet32_gcl.fmnist_lt', 'ResNet-32 cosine head, GCL stage 1 + cRT, Fashion-MNIST-LT (IF 100)', _GCL),
    'resnet32_nbn.fmnist_lt': _tag(
        'resnet32_nbn.fmnist_lt', 'ResNet-32 with Normalized BN, cross-entropy, Fashion-MNIST-LT (IF 100)', _NBN),
    'resnet32_cbn.fmnist_lt': _tag(
        'resnet32_cbn.fmnist_lt', 'ResNet-32 with Compound BN, dual path + Balanced Softmax, Fashion-MNIST-LT '
                                  '(IF 100)', _CBN),
    'resnet32.fmnist_lt_fsa': _tag(
        'resnet32.fmnist_lt_fsa', 'ResNet-32, cross-entropy + FSA phase II, Fashion-MNIST-LT (IF 100)', _FSA),
}

# The benchmark run directory each tag is published from (train/configs/fmnist_lt/*.yaml output_dir):
#   python -m lt_zoo.hub push runs/fmnist_lt/cbn --repo-id lt-zoo/resnet32_cbn.fmnist_lt
SOURCE_RUNS: Dict[str, str] = {
    'resnet32.fmnist_lt': 'runs/fmnist_lt/ce',
    'resnet32.fmnist_lt_bs': 'runs/fmnist_lt/balanced_softmax',
    'resnet32_gcl.fmnist_lt_ldam': 'runs/fmnist_lt/ldam_drw',
    'resnet32_gcl.fmnist_lt': 'runs/fmnist_lt/gcl_crt',
    'resnet32_nbn.fmnist_lt': 'runs/fmnist_lt/nbn',
    'resnet32_cbn.fmnist_lt': 'runs/fmnist_lt/cbn',
    'resnet32.fmnist_lt_fsa': 'runs/fmnist_lt/fsa',
}


def with_pretrained_tags(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{arch: cfg}`` -> the same cfgs plus every published ``arch.tag`` of these architectures.

    For an architecture with published tags the result holds ``arch.tag`` (its cfg updated with the
    table's overrides) for each tag, then ``arch.*`` (the untouched cfg, so it stays the default of the
    bare name).  Architectures without tags keep their single untagged entry.  Feed the result to
    ``timm.models.generate_default_cfgs``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for arch, cfg in cfgs.items():
        if '.' in arch:
            raise ValueError(f"with_pretrained_tags expects bare architecture names, got {arch!r}")
        tags = {name: overrides for name, overrides in PRETRAINED_TAGS.items() if name.split('.', 1)[0] == arch}
        for name, overrides in tags.items():
            out[name] = {**cfg, **overrides}
        out[f'{arch}.*' if tags else arch] = cfg
    return out
