"""Two-process (gloo, CPU) run of CompoundBatchNorm2d for tests/test_compound_bn_ddp.py.

``python tests/cbn_ddp_worker.py OUT_DIR`` spawns 2 ranks; for every case in CASES each rank feeds its
half of the same global batches (two training steps, so the second E-step sees the first update) and
writes its outputs, input gradients, parameter gradients and final buffers to
``OUT_DIR/<case>_rank<r>.safetensors``.  The test imports :func:`run_case` to compute the same thing on
the full batch in one process.
"""
import os
import socket
import sys

import torch

CASES = {
    'compound': dict(options={}, channels_last=False, split=False),
    'compound_mn_channels_last': dict(options={'combine': 'mn'}, channels_last=True, split=False),
    'compound_responsibility_grad': dict(options={'responsibility_grad': True}, channels_last=False, split=False),
    'split': dict(options={}, channels_last=False, split=True),
    # the Triton passes (in Triton's interpreter without a GPU: TRITON_INTERPRET from tests/conftest.py)
    'triton_mn_channels_last': dict(options={'combine': 'mn'}, channels_last=True, split=False, kernel='triton'),
    'triton_split': dict(options={}, channels_last=False, split=True, kernel='triton'),
}
BATCH, C, M, NUM_CLASSES, STEPS = 8, 6, 3, 10, 2


def case_data(name):
    """Deterministic layer state and (x, targets, upstream grad) for each step of a case."""
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    layer = CompoundBatchNorm2d(C, M, **CASES[name]['options'])
    layer.kernel = CASES[name].get('kernel', 'auto')
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(M, C, generator=g))
        layer.running_var.copy_(torch.rand(M, C, generator=g) + 0.5)
        layer.weight.copy_(torch.randn(M, C, generator=g))
        layer.bias.copy_(torch.randn(M, C, generator=g))
    steps = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, C, 3, 4, generator=g) * 1.5
        targets = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
        upstream = torch.randn(BATCH, C, 3, 4, generator=g)
        steps.append((x, targets, upstream))
    return layer, steps


def run_case(name, rows=slice(None)):
    """Run the case on batch rows ``rows``; returns a flat dict of tensors."""
    from lt_zoo.layers.compound_bn import split_norm
    layer, steps = case_data(name)
    spec = CASES[name]
    out = {}
    for i, (x, targets, upstream) in enumerate(steps):
        x = x[rows].clone(memory_format=torch.channels_last if spec['channels_last'] else torch.contiguous_format)
        x.requires_grad_()
        if spec['split']:
            with split_norm(layer, targets[rows], NUM_CLASSES):
                y = layer(x)
        else:
            y = layer(x)
        (y * upstream[rows]).sum().backward()
        out[f'y{i}'] = y.detach().contiguous()
        out[f'xgrad{i}'] = x.grad.contiguous()
    out['weight_grad'] = layer.weight.grad
    out['bias_grad'] = layer.bias.grad
    for k, v in layer.named_buffers():
        out[k] = v.clone()
    return out


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        half = BATCH // world
        for name in CASES:
            res = run_case(name, slice(rank * half, (rank + 1) * half))
            save_file({k: v.contiguous() for k, v in res.items()},
                      os.path.join(out_dir, f'{name}_rank{rank}.safetensors'))
        dist.barrier()  # neither rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


if __name__ == '__main__':
    import torch.multiprocessing as mp
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mp.spawn(_worker, args=(2, _free_port(), sys.argv[1]), nprocs=2, join=True)
