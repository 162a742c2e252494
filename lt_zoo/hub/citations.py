"""The papers behind each lt_zoo recipe, as BibTeX for model cards.

``PAPERS`` holds one entry per paper (authors, venues and arXiv ids checked against the arXiv / CVF /
publisher pages; the same list is in docs/README.md#papers).  ``METHOD_PAPERS`` maps every method label of
``lt_zoo.training.config.METHODS`` to its paper(s); :func:`papers_for` adds the papers of the stage-2 mode,
the loss and the normalisation layer that a run actually used.
"""
from typing import Dict, List, Optional, Tuple

__all__ = ['PAPERS', 'METHOD_PAPERS', 'papers_for']

PAPERS: Dict[str, Dict[str, str]] = {
    'resnet': dict(
        title='Deep Residual Learning for Image Recognition', venue='CVPR 2016', arxiv='1512.03385',
        bibtex="""@inproceedings{he2016resnet,
  title     = {Deep Residual Learning for Image Recognition},
  author    = {He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2016},
  eprint    = {1512.03385},
  archivePrefix = {arXiv}
}"""),
    'focal': dict(
        title='Focal Loss for Dense Object Detection', venue='ICCV 2017', arxiv='1708.02002',
        bibtex="""@inproceedings{lin2017focal,
  title     = {Focal Loss for Dense Object Detection},
  author    = {Lin, Tsung-Yi and Goyal, Priya and Girshick, Ross and He, Kaiming and Doll{\\'a}r, Piotr},
  booktitle = {IEEE International Conference on Computer Vision (ICCV)},
  year      = {2017},
  eprint    = {1708.02002},
  archivePrefix = {arXiv}
}"""),
    'class_balanced': dict(
        title='Class-Balanced Loss Based on Effective Number of Samples', venue='CVPR 2019', arxiv='1901.05555',
        bibtex="""@inproceedings{cui2019classbalanced,
  title     = {Class-Balanced Loss Based on Effective Number of Samples},
  author    = {Cui, Yin and Jia, Menglin and Lin, Tsung-Yi and Song, Yang and Belongie, Serge},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019},
  eprint    = {1901.05555},
  archivePrefix = {arXiv}
}"""),
    'ldam': dict(
        title='Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss', venue='NeurIPS 2019',
        arxiv='1906.07413',
        bibtex="""@inproceedings{cao2019ldam,
  title     = {Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss},
  author    = {Cao, Kaidi and Wei, Colin and Gaidon, Adrien and Arechiga, Nikos and Ma, Tengyu},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019},
  eprint    = {1906.07413},
  archivePrefix = {arXiv}
}"""),
    'decoupling': dict(
        title='Decoupling Representation and Classifier for Long-Tailed Recognition', venue='ICLR 2020',
        arxiv='1910.09217',
        bibtex="""@inproceedings{kang2020decoupling,
  title     = {Decoupling Representation and Classifier for Long-Tailed Recognition},
  author    = {Kang, Bingyi and Xie, Saining and Rohrbach, Marcus and Yan, Zhicheng and Gordo, Albert and
               Feng, Jiashi and Kalantidis, Yannis},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2020},
  eprint    = {1910.09217},
  archivePrefix = {arXiv}
}"""),
    'balanced_softmax': dict(
        title='Balanced Meta-Softmax for Long-Tailed Visual Recognition', venue='NeurIPS 2020', arxiv='2007.10740',
        bibtex="""@inproceedings{ren2020balanced,
  title     = {Balanced Meta-Softmax for Long-Tailed Visual Recognition},
  author    = {Ren, Jiawei and Yu, Cunjun and Sheng, Shunan and Ma, Xiao and Zhao, Haiyu and Yi, Shuai and
               Li, Hongsheng},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020},
  eprint    = {2007.10740},
  archivePrefix = {arXiv}
}"""),
    'fsa': dict(
        title='Feature Space Augmentation for Long-Tailed Data', venue='ECCV 2020', arxiv='2008.03673',
        bibtex="""@inproceedings{chu2020fsa,
  title     = {Feature Space Augmentation for Long-Tailed Data},
  author    = {Chu, Peng and Bian, Xiao and Liu, Shaopeng and Ling, Haibin},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2020},
  eprint    = {2008.03673},
  archivePrefix = {arXiv}
}"""),
    'logit_adjust': dict(
        title='Long-tail learning via logit adjustment', venue='ICLR 2021', arxiv='2007.07314',
        bibtex="""@inproceedings{menon2021logit,
  title     = {Long-tail learning via logit adjustment},
  author    = {Menon, Aditya Krishna and Jayasumana, Sadeep and Rawat, Ankit Singh and Jain, Himanshu and
               Veit, Andreas and Kumar, Sanjiv},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021},
  eprint    = {2007.07314},
  archivePrefix = {arXiv}
}"""),
    'gcl': dict(
        title='Long-Tailed Visual Recognition via Gaussian Clouded Logit Adjustment', venue='CVPR 2022',
        arxiv='2305.11733',
        bibtex="""@inproceedings{li2022gcl,
  title     = {Long-Tailed Visual Recognition via Gaussian Clouded Logit Adjustment},
  author    = {Li, Mengke and Cheung, Yiu-ming and Lu, Yang},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {6929--6938},
  year      = {2022},
  eprint    = {2305.11733},
  archivePrefix = {arXiv}
}"""),
    'cbn': dict(
        title='Compound Batch Normalization for Long-tailed Image Classification', venue='ACM MM 2022',
        arxiv='2212.01007',
        bibtex="""@inproceedings{cheng2022cbn,
  title     = {Compound Batch Normalization for Long-tailed Image Classification},
  author    = {Cheng, Lechao and Fang, Chaowei and Zhang, Dingwen and Li, Guanbin and Huang, Gang},
  booktitle = {Proceedings of the 30th ACM International Conference on Multimedia (ACM MM)},
  pages     = {1925--1934},
  year      = {2022},
  eprint    = {2212.01007},
  archivePrefix = {arXiv}
}"""),
    'nbn': dict(
        title='Normalizing Batch Normalization for Long-Tailed Recognition', venue='IEEE TIP 2025',
        arxiv='2501.03122',
        bibtex="""@article{bao2025nbn,
  title     = {Normalizing Batch Normalization for Long-Tailed Recognition},
  author    = {Bao, Yuxiang and Kang, Guoliang and Yang, Linlin and Duan, Xiaoyue and Zhao, Bo and
               Zhang, Baochang},
  journal   = {IEEE Transactions on Image Processing},
  year      = {2025},
  eprint    = {2501.03122},
  archivePrefix = {arXiv}
}"""),
}

# Method label (train config ``method``) -> its papers, the defining one first.  Plain CE baselines cite
# the architecture; CBN's recipe trains with Balanced Softmax (train/configs/methods/cbn.yaml).
METHOD_PAPERS: Dict[str, Tuple[str, ...]] = {
    'ce': ('resnet',),
    'ce_balanced': ('resnet',),
    'focal': ('focal',),
    'class_balanced': ('class_balanced',),
    'ldam_drw': ('ldam',),
    'logit_adjust': ('logit_adjust',),
    'balanced_softmax': ('balanced_softmax',),
    'gcl': ('gcl',),
    'nbn': ('nbn',),
    'cbn': ('cbn', 'balanced_softmax'),
    'crt': ('decoupling',),
    'lws': ('decoupling',),
    'tau_norm': ('decoupling',),
    'fsa': ('fsa',),
}

_STAGE_PAPERS = {'crt': 'decoupling', 'lws': 'decoupling', 'tau_norm': 'decoupling', 'fsa': 'fsa'}
_LOSS_PAPERS = {'focal': 'focal', 'class_balanced': 'class_balanced', 'ldam': 'ldam', 'logit_adjusted': 'logit_adjust',
                'balanced_softmax': 'balanced_softmax', 'gcl': 'gcl'}
_NORM_PAPERS = {'_cbn': 'cbn', '_nbn': 'nbn'}


def papers_for(method: str, stage: str = 'stage1', loss: Optional[str] = None,
               architecture: Optional[str] = None) -> List[str]:
    """Keys of ``PAPERS`` to cite for a run: the method's, then its stage-2 mode, loss and norm layer's.

    Raises ValueError for a method label without an entry in ``METHOD_PAPERS``.
    """
    if method not in METHOD_PAPERS:
        raise ValueError(f"no citation for method label {method!r}; add it to lt_zoo.hub.citations.METHOD_PAPERS "
                         f"(known: {sorted(METHOD_PAPERS)})")
    keys = list(METHOD_PAPERS[method])
    keys.append(_STAGE_PAPERS.get(stage))
    keys.append(_LOSS_PAPERS.get(loss))
    keys += [paper for suffix, paper in _NORM_PAPERS.items() if architecture and suffix in architecture]
    out: List[str] = []
    for k in keys:
        if k is not None and k not in out:
            out.append(k)
    return out
