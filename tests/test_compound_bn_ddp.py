"""Two gloo processes with half a batch each == one process with the whole batch (CBN under DDP).

Outputs, input gradients and running statistics must match the single-process run; parameter
gradients of the two ranks must sum to the single-process gradient (DDP then averages or sums them).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location('cbn_ddp_worker', os.path.join(HERE, 'cbn_ddp_worker.py'))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope='module')
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('cbn_ddp')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'cbn_ddp_worker.py'), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: [load_file(str(out / f'{name}_rank{r}.safetensors')) for r in range(2)] for name in worker.CASES}


@pytest.mark.parametrize('name', list(worker.CASES))
def test_two_ranks_equal_one_full_batch(rank_results, name):
    full = worker.run_case(name)
    ranks = rank_results[name]
    half = worker.BATCH // 2
    tol = dict(rtol=1e-5, atol=1e-5)
    for i in range(worker.STEPS):
        for key in (f'y{i}', f'xgrad{i}'):
            torch.testing.assert_close(torch.cat([ranks[0][key], ranks[1][key]]), full[key], **tol)
            assert ranks[0][key].shape[0] == half
    for key in ('weight_grad', 'bias_grad'):
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], full[key], **tol)
    for key in ('running_prior', 'running_mean', 'running_var', 'num_batches_tracked'):
        for r in range(2):  # global statistics: identical on both ranks, equal to the full batch's
            torch.testing.assert_close(ranks[r][key], full[key], **tol)
    # the case is not trivially local: per-rank statistics would differ from the global ones
    local = worker.run_case(name, slice(0, half))
    assert not torch.allclose(local['running_mean'], full['running_mean'], atol=1e-4)
