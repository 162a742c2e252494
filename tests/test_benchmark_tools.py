"""The measuring code of benchmarks/: the CBN layer diagnosis and the benchmark runner's record fingerprint."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


diag = _load('cbn_layer_diagnosis')


def test_fisher_ratio_matches_a_closed_form():
    # channel 0: classes at -1 and +1 with no within-class spread -> 1; channel 1: the same values for
    # both classes -> 0; channel 2: class means -1/+1, within-class values +-1 -> between 1, within 1 -> 1/2
    y = torch.tensor([0, 0, 1, 1])
    z = torch.tensor([[-1., 3., -2.], [-1., 5., 0.], [1., 3., 0.], [1., 5., 2.]], dtype=torch.float64)
    assert diag.fisher_ratio(z, y, 2) == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-12)


def test_fisher_ratio_weights_classes_equally_and_is_affine_invariant():
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    z = torch.randn(1000, 4, generator=gen, dtype=torch.float64) + y[:, None] * torch.tensor([0., 1., 2., 3.],
                                                                                          dtype=torch.float64)
    a, b = torch.tensor([2., -0.5, 7., 1e-3], dtype=torch.float64), torch.tensor([1., 2., 3., 4.], dtype=torch.float64)
    assert diag.fisher_ratio(z * a + b, y, 2) == pytest.approx(diag.fisher_ratio(z, y, 2), rel=1e-10)
    # equal class weights: a float64 reference written with numpy, per channel
    zn, yn = z.numpy(), y.numpy()
    ref = []
    for c in range(4):
        means = np.array([zn[yn == k, c].mean() for k in (0, 1)])
        within = np.mean([zn[yn == k, c].var() for k in (0, 1)])
        ref.append(means.var() / (means.var() + within))
    assert diag.fisher_ratio(z, y, 2) == pytest.approx(float(np.mean(ref)), rel=1e-10)


def test_runner_fingerprint_carries_the_protocol_version(monkeypatch):
    bench = _load('fmnist_lt')
    cfg = {'epochs': 25, 'lr': 0.1, 'output_dir': 'runs/x'}
    fp = bench.fingerprint(cfg)
    assert fp == bench.fingerprint(dict(cfg, output_dir='elsewhere'))  # where a run writes is not protocol
    assert fp != bench.fingerprint(dict(cfg, epochs=26))
    monkeypatch.setattr(bench, 'PROTOCOL_VERSION', bench.PROTOCOL_VERSION - 1)
    assert bench.fingerprint(cfg) != fp  # an older protocol's records never match


def test_runner_rows_summarise_every_recorded_seed_of_the_current_protocol(tmp_path, monkeypatch):
    """A table row reads every seed on disk whose record matches the protocol, whatever --seeds was given."""
    import json
    from types import SimpleNamespace
    bench = _load('fmnist_lt')
    monkeypatch.chdir(ROOT)  # the method configs are resolved relative to the repository
    monkeypatch.setattr(bench, 'ROOT', tmp_path)
    args = SimpleNamespace(runs='runs/bench', eval_every=None, compile=False)
    for seed, acc in ((0, 0.80), (1, 0.90), (4, 0.70), (2, 0.10)):
        fp = bench.fingerprint(bench.resolved_config('ce', seed, args)) if seed != 2 else 'made-by-an-older-protocol'
        d = tmp_path / bench.record_dir('ce', seed)
        d.mkdir(parents=True)
        (d / 'eval.json').write_text(json.dumps({'balanced_acc': acc, 'protocol_fingerprint': fp}))
    row = bench.summarise('ce', args)
    assert row['seeds'] == [0, 1, 4]  # seed 2's record is from another protocol
    assert row['balanced_acc_per_seed'] == [0.80, 0.90, 0.70]
    assert row['mean'] == pytest.approx(0.80)
    assert row['std'] == pytest.approx(0.10)  # sample std of (0.8, 0.9, 0.7)
    assert bench.summarise('balanced_softmax', args)['seeds'] == []


def test_runner_splices_the_summary_between_the_readme_markers_and_refuses_without_them(tmp_path, monkeypatch):
    bench = _load('fmnist_lt')
    monkeypatch.setattr(bench, 'ROOT', tmp_path)
    start, end = bench.README_MARKERS
    (tmp_path / 'README.md').write_text(f'# title\n\nbefore\n{start}\nold table\n{end}\nafter\n')
    bench.update_readme('| new | table |\n')
    bench.update_readme('| newer | table |\n')  # idempotent: the markers survive a splice
    assert (tmp_path / 'README.md').read_text() == f'# title\n\nbefore\n{start}\n| newer | table |\n{end}\nafter\n'
    (tmp_path / 'README.md').write_text(f'no markers here\n{end}\n')
    with pytest.raises(SystemExit, match='README.md must hold each marker once'):
        bench.update_readme('x\n')
    assert (tmp_path / 'README.md').read_text() == f'no markers here\n{end}\n'  # untouched
