"""Test-split evaluation under Accelerate: every test image exactly once, gathered across processes."""
import torch
from tqdm.auto import tqdm

from ..metrics import evaluate
from .config import LogConfig

__all__ = ['predict', 'evaluate_model']


@torch.no_grad()
def predict(accelerator, model, loader, progress: bool):
    """(logits (N, K) float32 on CPU, labels (N,)) of ``model`` in eval mode over ``loader``."""
    model.eval()
    outs, ys = [], []
    local = getattr(loader, 'full_on_every_rank', False)  # a TensorLoader: every rank sees every test image
    for x, y in tqdm(loader, desc='eval', leave=False, disable=not progress):
        logits = model(x).float()
        if not local:
            logits, y = accelerator.gather_for_metrics((logits, y))
        outs.append(logits.cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def evaluate_model(cfg: LogConfig, accelerator, model, loader, counts, progress: bool) -> dict:
    """lt_zoo.metrics.evaluate (top-1, balanced accuracy, many/medium/few, ECE, per class) on the loader."""
    logits, y = predict(accelerator, model, loader, progress)
    return evaluate(logits, y, list(map(int, counts)), many_threshold=cfg.many_threshold,
                    few_threshold=cfg.few_threshold)
