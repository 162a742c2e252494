"""The measuring code of benchmarks/: the CBN layer diagnosis, the benchmark runner (fingerprints, run
directories, targets), carry_over, cbn_budget, the pass bound, the kernel A/B, the GPU session and
norm_speed's profiles."""
import importlib.util
import os
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


def test_nmi_object_closed_forms():
    # components that follow object/background exactly: I(k; f) = H(k), NMI 1
    assert diag.nmi_binary(torch.tensor([[30.0, 0.0], [0.0, 70.0]], dtype=torch.float64)) == pytest.approx(1.0)
    # independent of it: the joint is the product of its marginals, NMI 0
    pf, pk = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert diag.nmi_binary(500 * pf[:, None] * pk[None]) == pytest.approx(0.0, abs=1e-12)
    # in general: sum p log p / (p_f p_k) over the joint, divided by H(k)
    sums = np.array([[12.0, 3.0, 5.0], [1.0, 9.0, 20.0]])
    joint = sums / sums.sum()
    mi = sum(joint[f, k] * np.log(joint[f, k] / (joint[f].sum() * joint[:, k].sum()))
             for f in range(2) for k in range(3))
    h_k = -sum(q * np.log(q) for q in joint.sum(0))
    assert diag.nmi_binary(torch.from_numpy(sums)) == pytest.approx(mi / h_k, rel=1e-12)


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


def test_runner_table_commands_paste_back_into_a_shell_as_the_protocol(monkeypatch):
    """Each table row's command, with seed K = 1, resolves through a shell split to the config the runner trains."""
    import shlex
    from types import SimpleNamespace
    from lt_zoo.training.config import load_config
    bench = _load('fmnist_lt')
    monkeypatch.chdir(ROOT)
    args = SimpleNamespace(runs='runs/bench', eval_every=None, compile=False)
    for run in bench.RUNS:
        words = shlex.split(bench.summarise(run, args)['command'].replace('K', '1'))
        assert words[:2] == ['python', 'train/train.py'], run
        argv = [w for w in words[2:] if not w.startswith('<')]
        if '--stage1_dir' in argv:  # the placeholder names the stage-1 run; the runner passes its directory
            argv.remove('--stage1_dir')
        shown = load_config(argv)
        shown = shown if isinstance(shown, dict) else shown.to_dict()
        assert bench.fingerprint(shown) == bench.fingerprint(bench.resolved_config(run, 1, args)), run


def test_runner_at_another_budget_keeps_its_runs_apart_and_scales_what_depends_on_the_budget(monkeypatch, capsys):
    """--epochs N (the papers' 200, on a GPU): stage-1 runs train N epochs, stage 2 keeps its own, the plateau
    rows train 0.8 N and LDAM-DRW re-weights from 0.8 N; records and tables are suffixed _e<N> and no
    fingerprint equals the protocol's; table commands paste back; bad budgets are refused before any work."""
    import shlex
    from types import SimpleNamespace
    from lt_zoo.training.config import load_config
    bench = _load('fmnist_lt')
    monkeypatch.chdir(ROOT)
    args = SimpleNamespace(runs='runs/bench', eval_every=None, compile=False)
    runs = ('ce', 'cbn', 'ldam_drw', 'gcl_crt', 'fsa')
    own = {r: bench.resolved_config(r, 0, args) for r in runs}
    own_fp = {r: bench.fingerprint(c) for r, c in own.items()}
    assert own['ldam_drw']['loss_kwargs']['drw_epoch'] == 40 and own['gcl_crt']['epochs'] == 5
    bench.configure(200)
    assert (bench.PROTOCOL_EPOCHS, bench.SHORT_EPOCHS, bench.SUFFIX) == (200, 160, '_e200')
    assert bench.PLATEAU_PAIRS == {'ce': 'ce_e160', 'balanced_softmax': 'bs_e160'} and 'ce_e40' not in bench.RUNS
    assert bench.record_dir('ce', 0) == bench.RESULTS / 'fmnist_lt_e200_runs' / 'ce' / 'seed0'
    assert bench.report_command() == 'python benchmarks/fmnist_lt.py --report_only --epochs 200'
    for run in runs + ('ce_e160',):
        cfg = bench.resolved_config(run, 0, args)
        want = {'gcl_crt': 5, 'fsa': own['fsa']['epochs'], 'ce_e160': 160}.get(run, 200)
        assert cfg['epochs'] == want, run
        if run in own:
            assert bench.fingerprint(cfg) != own_fp[run], run  # stage 2 too: its config is the same
            changed = bench.protocol_diff(own[run], cfg)
            assert changed == (['epochs'] if run not in ('ldam_drw', 'gcl_crt', 'fsa') else
                               ['epochs', 'loss_kwargs'] if run == 'ldam_drw' else []), (run, changed)
        words = shlex.split(bench.summarise(run, args)['command'].replace('K', '0'))
        argv = [w for w in words[2:] if not w.startswith('<') and w != '--stage1_dir']
        shown = load_config(argv)
        shown = shown if isinstance(shown, dict) else shown.to_dict()
        assert bench.fingerprint(shown) == bench.fingerprint(cfg), run
    assert bench.resolved_config('ldam_drw', 0, args)['loss_kwargs'] == dict(own['ldam_drw']['loss_kwargs'],
                                                                             drw_epoch=160)
    bench.configure()
    assert bench.SUFFIX == '' and bench.RECORDS == bench.RESULTS / 'fmnist_lt_runs' and 'ce_e40' in bench.RUNS
    assert bench.resolved_config('ldam_drw', 0, args) == own['ldam_drw']
    for argv, message in ((['--epochs', '4', '--plan'], '--epochs must be >= 5'),
                          (['--epochs', '200', '--report_only', '--update_readme'], "the README's table")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_protocol_version_pins_the_defaults_its_records_were_made_with():
    """The fingerprint hashes the resolved config, not the defaults of the layers it builds: a changed CBN,
    NBN, cosine-classifier or CIFAR-ResNet default would change what every record computes while its
    fingerprint still matched.  Changing one of these defaults must come with a PROTOCOL_VERSION bump
    (benchmarks/fmnist_lt.py), and then with this test's pinned values."""
    import inspect
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    from lt_zoo.layers.cosine_classifier import CosineClassifier
    from lt_zoo.layers.normalized_bn import NormalizedBatchNorm2d
    from lt_zoo.models.cifar_resnet import CifarResNet
    bench = _load('fmnist_lt')
    defaults = lambda cls: {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                            if p.default is not inspect.Parameter.empty and k not in ('device', 'dtype')}
    pinned = {4: {
        CompoundBatchNorm2d: dict(num_components=2, momentum=0.1, eps=1e-5, train_stats='batch',
                                  combine='posterior', responsibility_grad=False, temperature=1.0,
                                  perturbation=0.1),
        CosineClassifier: dict(scale=30.0),
        NormalizedBatchNorm2d: dict(eps=1e-5, momentum=0.1, norm_eps=1e-6, alpha_init=1.0),
        CifarResNet: dict(layers=(5, 5, 5), num_classes=10, in_chans=3, widths=(16, 32, 64), shortcut='A',
                          head='linear', cosine_scale=30.0, global_pool='avg', drop_rate=0.0,
                          norm_layer=torch.nn.BatchNorm2d, zero_init_last=False, norm_setup=None),
    }}
    assert bench.PROTOCOL_VERSION in pinned, 'a new protocol version: pin the defaults its records use'
    for cls, expected in pinned[bench.PROTOCOL_VERSION].items():
        assert defaults(cls) == expected, cls.__name__


def test_compiled_block_report_divides_by_bn_of_the_same_cell_and_refuses_bad_sizes(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))  # the scripts import benchmarks/machine.py as a sibling
    block = _load('cbn_compiled_block')
    cells = [dict(norm=n, memory_format=f, layout_optimization=lo, median_ms=base * k, convolution_ms=1.0,
                  generated_code_ms=gen * k)
             for f, lo, base, gen in (('contiguous', 'on', 2.0, 0.5), ('channels_last', 'off', 4.0, 1.0))
             for n, k in (('bn', 1.0), ('cbn', 1.5 if f == 'contiguous' else 3.0))]
    res = dict(command='c', torch='t', cpu='x', threads=1, date='d', channels=8, size=4, batch=2, steps=3,
               rounds=1, cells=cells)
    block.write_markdown(res, str(tmp_path / 'r.md'))
    rows = [line.strip(' |').split(' | ') for line in (tmp_path / 'r.md').read_text().splitlines()
            if line.startswith('| cbn')]
    assert [(r[1], r[2], r[4], r[7]) for r in rows] == [('contiguous', 'on', '1.50', '1.50'),
                                                         ('channels_last', 'off', '3.00', '3.00')]
    with pytest.raises(SystemExit):
        block.main(['--channels', '0', '--out', str(tmp_path / 'never')])
    assert '--channels must be >= 1, got 0' in capsys.readouterr().err
    assert not list(tmp_path.glob('never*'))


EMPTY_ROW = dict(mean=None, seeds=[], last_fifth_gain=None)


@pytest.fixture
def bench_in_tmp(tmp_path, monkeypatch):
    """benchmarks/fmnist_lt.py writing its results under tmp_path, and a row per run with no seed."""
    bench = _load('fmnist_lt')
    monkeypatch.setattr(bench, 'ROOT', tmp_path)
    (tmp_path / bench.RESULTS).mkdir(parents=True)
    return bench, {r: dict(EMPTY_ROW) for r in bench.RUNS}


def test_targets_judge_the_best_row_with_enough_seeds_and_name_a_better_row_with_fewer(bench_in_tmp, tmp_path):
    import json
    bench, rows = bench_in_tmp
    empty = EMPTY_ROW
    rows['bs_aa'] = dict(empty, mean=0.85, seeds=[0, 1, 2])
    rows['bs_aa_cbn'] = dict(empty, mean=0.88, seeds=[0, 1, 2])   # +3.0 over 3 seeds: met
    rows['cbn_m4'] = dict(empty, mean=0.90, seeds=[0])             # better, but one seed: named only
    targets = {t['target']: t for t in bench.write_targets(rows)}
    cbn = targets['best CBN row >= bs_aa + 2.0 points']
    assert cbn['rows'] == ['bs_aa_cbn', 'bs_aa'] and cbn['verdict'] == 'met'
    assert cbn['value'] == pytest.approx(0.03)
    assert cbn['text'].endswith('best with fewer seeds: cbn_m4 90.00 (1 seed(s))')
    rows['bs_aa_cbn'] = dict(empty, mean=0.84, seeds=[0, 1])      # no CBN row has 3 seeds: pending on the best
    cbn = {t['target']: t for t in bench.write_targets(rows)}['best CBN row >= bs_aa + 2.0 points']
    assert cbn['rows'] == ['cbn_m4', 'bs_aa'] and cbn['verdict'].startswith('pending')
    assert json.loads((tmp_path / bench.RESULTS / 'targets.json').read_text())['targets'][0]['rows'] == cbn['rows']


def test_plateau_target_judges_the_budget_gain_and_keeps_the_within_run_gain_apart(bench_in_tmp):
    bench, rows = bench_in_tmp
    empty = EMPTY_ROW
    rows['ce'] = dict(empty, mean=0.803, seeds=[0, 1, 2], last_fifth_gain=0.009)
    rows['ce_e40'] = dict(empty, mean=0.800, seeds=[0, 1, 2])
    rows['balanced_softmax'] = dict(empty, mean=0.880, seeds=[0, 1, 2])
    rows['bs_e40'] = dict(empty, mean=0.870, seeds=[0, 1])
    targets = {t['target']: t for t in bench.write_targets(rows)}
    ce = targets['ce plateaus: 50 epochs add < 0.5 points over 40']
    assert ce['rows'] == ['ce', 'ce_e40'] and ce['verdict'] == 'met' and ce['value'] == pytest.approx(0.003)
    within = [t for t in targets.values() if t['target'].startswith('ce, within one run')]
    assert len(within) == 1 and within[0]['verdict'] == 'missed' and within[0]['value'] == pytest.approx(0.009)
    bs = targets['balanced_softmax plateaus: 50 epochs add < 0.5 points over 40']
    assert bs['verdict'].startswith('pending') and bs['value'] == pytest.approx(0.01)
    rows['ce_e40'] = dict(empty, mean=0.797, seeds=[0, 1, 2])  # 0.6 points over the last fifth of the budget
    ce = {t['target']: t for t in bench.write_targets(rows)}['ce plateaus: 50 epochs add < 0.5 points over 40']
    assert ce['verdict'] == 'missed' and ce['value'] == pytest.approx(0.006)
    import yaml
    base = yaml.safe_load((ROOT / 'train' / 'configs' / 'fmnist_lt' / '_base.yaml').read_text())
    assert bench.PROTOCOL_EPOCHS == base['epochs'] == 50  # read from the protocol's config (v4: 50)
    assert bench.SHORT_EPOCHS == 40 and bench.PLATEAU_PAIRS == {'ce': 'ce_e40', 'balanced_softmax': 'bs_e40'}
    assert bench.RUNS['ce_e40'][2] == {'epochs': 40} and bench.RUNS['bs_e40'][1] == 'balanced_softmax.yaml'


def test_a_stage2_pair_retrains_its_stage1_when_the_run_directory_has_no_model(tmp_path, monkeypatch):
    import argparse
    bench = _load('fmnist_lt')
    monkeypatch.setattr(bench, 'ROOT', tmp_path)
    args = argparse.Namespace(runs='runs', eval_every=None, compile=False)
    fps = {('fsa', 1): 'x', ('gcl_crt', 2): 'y', ('ce', 2): 'z'}
    done = tmp_path / 'runs' / 'gcl' / 'seed2'
    done.mkdir(parents=True)
    (done / 'model.safetensors').write_bytes(b'')
    todo = bench.with_missing_stage1(args, [('ce', 2), ('fsa', 1), ('gcl_crt', 2), ('fsa', 2)], fps)
    # fsa seed 1 has no ce run: ce seed 1 is trained right before it; gcl seed 2 is finished; ce seed 2 is queued
    assert todo == [('ce', 2), ('ce', 1), ('fsa', 1), ('gcl_crt', 2), ('fsa', 2)]
    assert fps[('ce', 1)] == bench.fingerprint(bench.resolved_config('ce', 1, args))


def test_pass_bound_sums_the_resnet32_layers_and_divides_by_bn_of_the_same_map(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    bound = _load('cbn_pass_bound')
    cells = [dict(m=None if p == 'bn_forward' else 4, pass_=p, channels=c, side=s, batch=64, elements=64 * c * s * s,
                  us=float(c) * (1 + i), ns_per_element=0.5 * (1 + i))
             for c, s, _ in bound.RESNET32_16 for i, p in enumerate(bound.PASSES)]
    res = dict(command='c', torch='t', cpu='x', threads=1, min_time=0.1, rounds=1, date='d', cells=cells,
               fixed_us={'bn': dict(train_us=100.0, eval_us=10.0), 'cbn_m4': dict(train_us=300.0, eval_us=20.0)},
               layout=[dict(m=4, pass_='eval', channels=32, side=8, batch=64, contiguous_us=200.0,
                            channels_last_us=250.0)])
    res['network'] = bound.network_totals(res)
    # training passes: (3 + 4 + 5 + 6) * (16 * 11 + 32 * 10 + 64 * 10) us; eval: 2 * the same layer sum
    layer_sum = 16 * 11 + 32 * 10 + 64 * 10
    assert res['network'] == [dict(m=4, batch=64, train_ms=18 * layer_sum / 1e3, eval_ms=2 * layer_sum / 1e3,
                                   bn_forward_ms=layer_sum / 1e3)]
    assert bound.network_totals(res, n=32) == []
    bound.write_markdown(res, str(tmp_path / 'r.md'))
    text = (tmp_path / 'r.md').read_text()
    assert '| 4 | estep_moments | 16x16x16 | 1.500 (3.0x) |' in text  # 0.5 * 3 over BN's 0.5
    assert f"| 4 | {18 * layer_sum / 1e3:.1f} | {2 * layer_sum / 1e3:.1f} | {layer_sum / 1e3:.1f} | 6.2 |" in text
    assert '| eval | 32x8x8 | 200 | 250 | 1.25x |' in text
    with pytest.raises(SystemExit):
        bound.main(['--components', '0', '--batches', '0', '--out', str(tmp_path / 'never')])
    err = capsys.readouterr().err
    assert '--components must be 1..64, got 0' in err and '--batches must be >= 1, got 0' in err
    assert not list(tmp_path.glob('never*'))


def test_kernel_ab_times_a_revisions_library_against_this_one_and_sums_the_layers(tmp_path, capsys):
    """benchmarks/cbn_kernel_ab.py: builds the kernel of a git revision, routes compound_bn_native's calls
    to it and back, and sums each pass over ResNet-32's layers; bad input is refused before any build."""
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    ab = _load('cbn_kernel_ab')
    from lt_zoo.layers import compound_bn_native as native
    with pytest.raises(SystemExit) as e:
        ab.main(['--base', 'no-such-revision', '--out', str(tmp_path / 'never')])
    assert 'no-such-revision' in str(e.value) and 'git cannot show' in str(e.value)
    with pytest.raises(SystemExit):
        ab.main(['--base', 'HEAD', '--rounds', '0', '--components', '0', '--out', str(tmp_path / 'never')])
    err = capsys.readouterr().err
    assert '--rounds must be >= 1, got 0' in err and '--components must be 1..64, got 0' in err
    assert not list(tmp_path.glob('never*'))

    ab.main(['--base', 'HEAD', '--components', '2', '--memory_formats', 'channels_last', '--batch', '2',
             '--rounds', '1', '--min_time', '0.001', '--out', str(tmp_path / 'ab')])
    import json
    res = json.loads((tmp_path / 'ab.json').read_text())
    assert [(c['pass_'], c['channels']) for c in res['cells']] == [
        (p, c) for c, _, _ in ab.RESNET32_16 for p in ab.CBN_PASSES]
    layers = {c: n for c, _, n in ab.RESNET32_16}
    rows = {r['part']: r for r in res['network']}
    for p in ab.CBN_PASSES:
        want = sum(c['base_us'] * layers[c['channels']] for c in res['cells'] if c['pass_'] == p) / 1e3
        assert rows[p]['base_ms'] == pytest.approx(want)
    assert rows['training (the four above)']['this_ms'] == pytest.approx(
        sum(rows[p]['this_ms'] for p in ab.TRAIN_PASSES))
    assert '| 2 | channels_last | eval |' in (tmp_path / 'ab.md').read_text()
    mine, other = native._lib, object()
    with ab.using(other):
        assert native._lib is other
    assert native._lib is mine


def _protocol_tree(tmp_path, bench, monkeypatch):
    """tmp_path as the repository root: the protocol's configs linked in, results and runs written there."""
    import argparse
    (tmp_path / 'train').symlink_to(ROOT / 'train')
    monkeypatch.setattr(bench, 'ROOT', tmp_path)
    monkeypatch.chdir(tmp_path)
    return argparse.Namespace(runs='runs/bench', eval_every=None, compile=False)


def test_runner_refuses_run_directories_of_another_protocol_before_training(tmp_path, monkeypatch):
    import json
    import yaml
    bench = _load('fmnist_lt')
    args = _protocol_tree(tmp_path, bench, monkeypatch)
    cfg = bench.resolved_config('ce', 0, args)
    fp = bench.fingerprint(cfg)
    out = tmp_path / bench.run_dir(args, 'ce', 0)
    assert bench.run_dir_mismatch(args, 'ce', 0, fp) is None  # no directory: nothing to refuse
    out.mkdir(parents=True)
    (out / 'config.yaml').write_text(yaml.safe_dump(dict(cfg, output_dir='anywhere')))
    assert bench.run_dir_mismatch(args, 'ce', 0, fp) is None  # where it wrote is not protocol
    (out / 'config.yaml').write_text(yaml.safe_dump(dict(cfg, epochs=25)))
    assert 'epochs: 25 (protocol: 50)' in bench.run_dir_mismatch(args, 'ce', 0, fp)
    (out / 'config.yaml').write_text(yaml.safe_dump(cfg))
    (out / bench.STAMP).write_text(json.dumps({'protocol_fingerprint': 'older'}))
    assert 'recorded under protocol fingerprint older' in bench.run_dir_mismatch(args, 'ce', 0, fp)
    # the runner stops before it trains anything, and the directory is left as it was
    trained = []
    monkeypatch.setattr(bench, 'schedule', lambda *a: trained.append(a) or [])
    with pytest.raises(SystemExit, match='runs/bench/ce/seed0 was recorded under protocol fingerprint older'):
        bench.main(['--runs_only', 'ce', 'fsa', '--seeds', '0', '--tables', 'fmnist_lt'])
    assert trained == [] and json.loads((out / bench.STAMP).read_text()) == {'protocol_fingerprint': 'older'}


def test_carry_over_copies_only_same_config_records_of_unchanged_models(tmp_path, monkeypatch):
    import json
    import yaml
    carry = _load('carry_over')
    bench = carry.bench
    args = _protocol_tree(tmp_path, bench, monkeypatch)
    monkeypatch.setattr(carry, 'ROOT', tmp_path)
    old = tmp_path / 'old_records'

    def old_record(name, seed, cfg, acc):
        d = old / name / f'seed{seed}'
        d.mkdir(parents=True)
        (d / 'config.yaml').write_text(yaml.safe_dump(cfg))
        (d / 'eval.json').write_text(json.dumps({'balanced_acc': acc, 'protocol_fingerprint': 'v-old'}))
        (d / 'metrics.jsonl').write_text('{"epoch": 1}\n')

    ce = bench.resolved_config('ce', 0, args)
    old_record('ce_e50', 0, dict(ce, output_dir='runs/old/ce_e50/seed0'), 0.81)   # same config: carried
    old_record('ce', 1, dict(bench.resolved_config('ce', 1, args), epochs=25), 0.70)  # another budget: not
    old_record('cbn_e50', 0, bench.resolved_config('bs_aa_cbn', 0, args), 0.90)   # a changed model: not
    run_dir = tmp_path / 'old_runs' / 'ce_e50' / 'seed0'
    run_dir.mkdir(parents=True)
    (run_dir / 'model.safetensors').write_bytes(b'weights')
    cli = ['--records', str(old), '--old_runs', str(tmp_path / 'old_runs'), '--unchanged_models', 'resnet32',
           '--seeds', '0', '1']
    assert carry.carry_over(carry.parse_args(cli)) == [('ce', 0, 'ce_e50')]
    fp = bench.fingerprint(ce)
    assert bench.is_recorded('ce', 0, fp) and not bench.is_recorded('ce', 1, bench.fingerprint(
        bench.resolved_config('ce', 1, args)))
    ev = json.loads((tmp_path / bench.record_dir('ce', 0) / 'eval.json').read_text())
    assert ev['balanced_acc'] == 0.81 and ev['carried_over_from'].endswith('old_records/ce_e50/seed0')
    assert not bench.is_recorded('bs_aa_cbn', 0, bench.fingerprint(bench.resolved_config('bs_aa_cbn', 0, args)))
    moved = tmp_path / bench.run_dir(args, 'ce', 0)
    assert (moved / 'model.safetensors').read_bytes() == b'weights' and not run_dir.exists()
    assert bench.run_dir_mismatch(args, 'ce', 0, fp) is None  # stamped with the current fingerprint
    row = bench.summarise('ce', args)
    assert row['seeds'] == [0] and list(row['carried_over']) == [0]
    assert carry.carry_over(carry.parse_args(cli)) == []  # recorded now: nothing is replaced



def test_cbn_budget_reads_checked_records_and_refuses_a_mislabelled_one(tmp_path, monkeypatch):
    import json
    import yaml
    budget = _load('cbn_budget')
    monkeypatch.setattr(budget, 'RESULTS', tmp_path)

    def record(rel, seed, acc, **cfg):
        d = tmp_path / rel / f'seed{seed}'
        d.mkdir(parents=True)
        (d / 'config.yaml').write_text(yaml.safe_dump(dict(dict(seed=seed, train_aug='strong', model_kwargs={}),
                                                           **cfg)))
        (d / 'eval.json').write_text(json.dumps({'balanced_acc': acc}))

    # v3 records name M only when it is not v3's default 4; v4's default is 2
    record(f'{budget.V3}/m4', 0, 0.80, epochs=25, model='resnet32_cbn')
    record(f'{budget.V3}/m4', 1, 0.84, epochs=25, model='resnet32_cbn', model_kwargs={'num_components': 4})
    record(f'{budget.V4}/m2', 0, 0.88, epochs=50, model='resnet32_cbn')
    got = budget.read_row('resnet32_cbn', 4, {25: f'{budget.V3}/m4'})
    assert got[25]['seeds'] == [0, 1] and got[25]['balanced_acc_per_seed'] == [0.80, 0.84]
    assert budget.read_row('resnet32_cbn', 2, {50: f'{budget.V4}/m2'})[50]['balanced_acc_per_seed'] == [0.88]
    with pytest.raises(SystemExit, match='M 2, .*is not the row .*M 4,'):
        budget.read_row('resnet32_cbn', 4, {50: f'{budget.V4}/m2'})  # a v4 default-M record is M = 2
    with pytest.raises(SystemExit, match='epochs 25.*is not the row \\(50 epochs'):
        budget.read_row('resnet32_cbn', 4, {50: f'{budget.V3}/m4'})
    assert budget.read_row('resnet32', None, {50: f'{budget.V4}/none'})[50]['seeds'] == []  # not trained yet


def test_runner_plan_prices_the_pairs_left_by_the_records_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import json
    import yaml
    bench = _load('fmnist_lt')
    args = _protocol_tree(tmp_path, bench, monkeypatch)
    fp = bench.fingerprint(bench.resolved_config('ce', 0, args))
    rec = tmp_path / bench.record_dir('ce', 0)  # ce seed 0 recorded: 1200 s over 50 epochs = 0.4 min per epoch
    rec.mkdir(parents=True)
    (rec / 'eval.json').write_text(json.dumps({'wall_time_s': 1200.0, 'protocol_fingerprint': fp}))
    (rec / 'config.yaml').write_text(yaml.safe_dump({'epochs': 50}))
    old = tmp_path / bench.RESULTS / 'v3_25_epochs' / 'fmnist_lt_runs' / 'gcl' / 'seed0'  # archived only
    old.mkdir(parents=True)
    (old / 'eval.json').write_text(json.dumps({'wall_time_s': 1500.0}))
    (old / 'config.yaml').write_text(yaml.safe_dump({'epochs': 25}))
    resumed = tmp_path / bench.run_dir(args, 'ce', 1)  # ce seed 1 stopped after 10 epochs
    (resumed / 'checkpoints' / 'epoch_0010').mkdir(parents=True)
    (resumed / 'checkpoints' / '.tmp_epoch_0011').mkdir()  # an unfinished write is not a checkpoint
    (resumed / 'config.yaml').write_text(yaml.safe_dump(bench.resolved_config('ce', 1, args)))
    monkeypatch.setattr(bench, 'schedule', lambda *a: pytest.fail('--plan trained'))
    from lt_zoo.training.run_dir import run_dir_lock
    with run_dir_lock(str(tmp_path / bench.run_dir(args, 'gcl', 0))):  # another runner trains gcl seed 0 now
        bench.main(['--plan', '--runs_only', 'ce', 'gcl', 'gcl_crt', '--seeds', '0', '1', '--tables', 'fmnist_lt'])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| `')]
    assert rows == [f'| `gcl` | 0 | 1.00 (1) * | 0 of 50 (training now: process {os.getpid()}) | 50 |',
                    '| `gcl_crt` | 0 | ? (0) | 0 of 5 | ? |',
                    '| `ce` | 1 | 0.40 (1) | 10 of 50 | 16 |',  # table order within a seed, stage 2 last
                    '| `gcl` | 1 | 1.00 (1) * | 0 of 50 | 50 |',
                    '| `gcl_crt` | 1 | ? (0) | 0 of 5 | ? |']
    assert '5 (run, seed) pairs to train' in out
    assert 'Estimated: 1.9 core-hours; no estimate for 2 pair(s) of rows never recorded: gcl_crt.' in out
    assert '`gcl` (benchmarks/results/v3_25_epochs/fmnist_lt_runs)' in out
    assert not (tmp_path / bench.RESULTS / 'fmnist_lt.md').exists()  # a plan writes no table


def test_record_seconds_counts_every_process_of_a_resumed_run(tmp_path):
    import json
    bench = _load('fmnist_lt')
    old, new = tmp_path / 'old', tmp_path / 'new'
    for d, ev, times in ((old, {'wall_time_s': 300.0}, [600.0, 400.0]),  # written before resumed_at_epoch
                         (new, {'wall_time_s': 1200.0, 'resumed_at_epoch': 1}, [650.0, 650.0])):
        d.mkdir()
        (d / 'eval.json').write_text(json.dumps(ev))
        (d / 'metrics.jsonl').write_text(''.join(json.dumps({'epoch': i + 1, 'time_s': t}) + '\n'
                                                 for i, t in enumerate(times)))
    # the old record's wall_time_s saw only its last process: its epochs' own times (1000 s) are the floor
    assert bench.record_seconds(old) == 1000.0
    # a new record's wall_time_s already counts every process (it includes evaluation; time_s does not)
    assert bench.record_seconds(new) == 1200.0
    (old / 'metrics.jsonl').unlink()
    assert bench.record_seconds(old) == 300.0


def test_runner_skips_pairs_another_process_trains_and_their_stage_2(tmp_path, monkeypatch, capsys):
    bench = _load('fmnist_lt')
    args = _protocol_tree(tmp_path, bench, monkeypatch)
    args.jobs = 1
    trained = []
    monkeypatch.setattr(bench, 'train_one', lambda a, run, seed, fp, log: trained.append((run, seed)))
    from lt_zoo.training.run_dir import run_dir_lock
    pairs = [('gcl', 0), ('gcl_crt', 0), ('gcl', 1), ('gcl_crt', 1), ('ce', 0)]
    with run_dir_lock(str(tmp_path / bench.run_dir(args, 'gcl', 0))):
        failed = bench.schedule(args, pairs, {p: 'fp' for p in pairs})
    assert failed == []
    assert trained == [('ce', 0), ('gcl', 1), ('gcl_crt', 1)]  # gcl seed 0 and its stage 2 left alone
    out = capsys.readouterr().out
    assert f'gcl seed 0: skipped, process {os.getpid()} is training it' in out
    assert "skipped (trained by another process): [('gcl', 0), ('gcl_crt', 0)]" in out


def test_gpu_session_packs_exactly_one_budgets_results_and_the_progress_of_unfinished_pairs(tmp_path):
    import tarfile
    session = _load('gpu_session')
    res, out = tmp_path / 'benchmarks' / 'results', tmp_path / 'out'
    out.mkdir()
    for rel in ('gpu_speed.json', 'gpu_speed.md', 'gpu_exactness.json', 'gpu_layer_speed.md', 'fmnist_lt_e200.md', 'plateau_e200_curves.png',
                'fmnist_lt_e200_runs/ce/seed0/eval.json', 'fmnist_lt_e200_runs/ce/seed0/metrics.jsonl',
                # not this budget's: the protocol's own table, another budget, a look-alike
                'fmnist_lt.md', 'fmnist_lt_e20.md', 'fmnist_lt_e2000.md', 'fmnist_lt_e20_runs/ce/seed0/eval.json'):
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_text(rel)
    runs = tmp_path / 'runs' / 'bench_e200'
    for pair in ('ce/seed0', 'bs_aa/seed1'):  # ce has a record, bs_aa seed 1 was stopped by the budget
        (runs / pair).mkdir(parents=True)
        (runs / pair / 'metrics.jsonl').write_text(pair)
    archive = session.pack(str(tmp_path), str(out), 200)
    with tarfile.open(archive) as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
        progress = tar.extractfile('.device/progress/e200/bs_aa/seed1/metrics.jsonl').read()
    assert files == sorted([
        'benchmarks/results/gpu_speed.json', 'benchmarks/results/gpu_speed.md',
        'benchmarks/results/gpu_exactness.json', 'benchmarks/results/gpu_layer_speed.md',
        'benchmarks/results/fmnist_lt_e200.md', 'benchmarks/results/plateau_e200_curves.png',
        'benchmarks/results/fmnist_lt_e200_runs/ce/seed0/eval.json',
        'benchmarks/results/fmnist_lt_e200_runs/ce/seed0/metrics.jsonl',
        '.device/progress/e200/bs_aa/seed1/metrics.jsonl'])
    assert progress == b'bs_aa/seed1'


def test_gpu_session_stages_a_revisions_package_for_the_layer_comparison(tmp_path):
    """``prepare --base REV`` puts REV's lt_zoo/ (as git stores it, not the working tree's) where the device
    command finds it, with the revision named; a second staging replaces the first."""
    import subprocess
    session = _load('gpu_session')
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not rev:  # a clean clone always has a HEAD: an empty answer is a failure, not a reason to skip
        pytest.fail('git rev-parse HEAD gave nothing')
    dest = tmp_path / 'base'
    (dest / 'stale').mkdir(parents=True)
    session.stage_base(rev, str(dest))
    assert not (dest / 'stale').exists() and (dest / 'REV').read_text() == rev + '\n'
    stored = subprocess.run(['git', 'show', f'{rev}:lt_zoo/layers/compound_bn.py'], cwd=ROOT, capture_output=True,
                            text=True).stdout
    assert (dest / 'lt_zoo' / 'layers' / 'compound_bn.py').read_text() == stored
    assert sorted(p.name for p in dest.iterdir()) == ['REV', 'lt_zoo']


def test_gpu_session_refuses_an_unknown_base_revision_before_downloading(tmp_path):
    import subprocess
    import sys
    fmnist = tmp_path / 'fmnist'
    fmnist.mkdir()
    for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
                 't10k-labels-idx1-ubyte.gz'):
        (fmnist / name).write_bytes(b'')
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_session.py'), 'prepare', '--fmnist_dir',
                           str(fmnist), '--base', 'no-such-rev'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--base 'no-such-rev' is not a git revision here" in proc.stderr, proc.stderr


@pytest.mark.parametrize('argv,message', [
    (['run', '--out', 'MISSING'], r"--out '.*missing' is not a folder"),
    (['run', '--out', 'OUT', '--minutes', '1'], r'--minutes 1.0 and --speed_minutes 4.0; expected minutes > 1'),
    (['run', '--out', 'OUT', '--minutes', '3', '--speed_minutes', '3'], r'expected minutes > 1 and 0 <= speed_'),
    (['run', '--out', 'OUT', '--epochs', '0'], r'--epochs 0; expected a positive number of epochs'),
    (['prepare', '--fmnist_dir', 'OUT'], r"--fmnist_dir '.*out' lacks train-images-idx3-ubyte.gz, .*; expected "
                                         r"Fashion-MNIST's four IDX files"),
])
def test_gpu_session_refuses_bad_input_before_any_work(tmp_path, argv, message):
    import re
    import subprocess
    import sys
    out = tmp_path / 'out'
    out.mkdir()
    argv = [str(tmp_path / a.lower()) if a in ('MISSING', 'OUT') else a for a in argv]
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_session.py')] + argv, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert re.search(message, proc.stderr), proc.stderr
    assert list(out.iterdir()) == []  # no log, no archive, nothing staged


def test_norm_speed_profile_counts_calls_per_step_and_renders_both_models(tmp_path):
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    ns = _load('norm_speed')
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    prof = ns.profile_step(model, opt, x, y, top=50, aten_only=True, steps=3)
    ops = {p['op']: p for p in prof}
    # two convolutions forward and backward in each of the 3 profiled steps: counts are per step
    assert ops['aten::convolution']['calls'] == 2
    assert ops['aten::convolution_backward']['calls'] == 2
    assert all(p['op'].startswith('aten::') for p in prof)
    assert [p['self_ms'] for p in prof] == sorted((p['self_ms'] for p in prof), reverse=True)
    assert 0 < sum(p['share'] for p in prof) <= 1 + 1e-9
    everything = ns.profile_step(model, opt, x, y, top=500, aten_only=False, steps=2)
    assert any(not p['op'].startswith('aten::') for p in everything)  # e.g. the optimizer step
    assert sum(p['share'] for p in everything) == pytest.approx(1.0, abs=1e-6)

    row = dict(train_wall=1.0, train_cpu=1.0, eval_wall=0.5, eval_cpu=0.5, train_img_s=64.0, eval_img_s=128.0,
               first_step_s=1.0)
    prof_row = [dict(op='lt_zoo::cbn_native_train', calls=31, self_ms=9.256, share=0.1044)]
    models = {'bn': dict(row, profile=[dict(op='aten::mkldnn_convolution', calls=31, self_ms=20.0, share=0.25)]),
              'cbn_m4': dict(row, train_cpu=1.2, profile=prof_row)}
    res = dict(batch=64, reps=1, warmup=0, targets=ns.TARGETS, command='c', layers={},
               environment=dict(torch='t', cpu='x', cpu_count=2, date='d'),
               cells={'16x16 1t compiled': dict(models=models, load_before=1.0, load_after=1.0)})
    ns.write_markdown(res, str(tmp_path / 'r.md'))
    text = (tmp_path / 'r.md').read_text()
    assert 'Compiled training step, 16x16 1t compiled: top operators' in text
    assert '| cbn_m4 | lt_zoo::cbn_native_train | 31 | 9.26 | 10.4% |' in text
    assert '| bn | aten::mkldnn_convolution | 31 | 20.00 | 25.0% |' in text
    assert 'Disturbed' not in text  # no NBN control in this cell: nothing to judge the noise by

    # NBN, the control: 1.02x is within the tolerance, 0.93x (a sitting on a busy host) is flagged
    for nbn_train, flagged in ((1.02, False), (0.93, True)):
        models['nbn'] = dict(row, train_cpu=nbn_train)
        ns.write_markdown(res, str(tmp_path / 'r.md'))
        text = (tmp_path / 'r.md').read_text()
        assert ('16x16 1t compiled (training %.2fx, eval 1.00x)' % nbn_train in text) == flagged
        assert ns.disturbed_cells(res) == ([('16x16 1t compiled', pytest.approx(nbn_train), 1.0)] if flagged else [])


def test_op_overhead_times_both_kernels_per_map_and_sums_resnet32s_layers(tmp_path, capsys):
    """benchmarks/cbn_op_overhead.py: one row per map (the fixed-cost map first), the network total is the
    per-call time times each shape's layer count; bad options are refused before any timing."""
    import json
    import sys
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    bench = _load('cbn_op_overhead')
    with pytest.raises(SystemExit):
        bench.main(['--rounds', '0', '--out', str(tmp_path / 'never')])
    assert '--rounds must be >= 1' in capsys.readouterr().err and not list(tmp_path.glob('never*'))
    bench.main(['--rounds', '1', '--min_time', '0.001', '--components', '2', '--out', str(tmp_path / 'o')])
    res = json.loads((tmp_path / 'o.json').read_text())
    assert [(r['map'], r['layers']) for r in res['maps']] == [('2x64x2x2', 0), ('64x16x16x16', 11), ('64x32x8x8', 10),
                                                              ('64x64x4x4', 10)]
    for k in bench.KERNELS:
        assert res['resnet32'][k] == pytest.approx(sum(r['layers'] * r[k] for r in res['maps']))
        assert all(r[k] > 0 for r in res['maps'])
    text = (tmp_path / 'o.md').read_text()
    assert '| 2x64x2x2 |' in text and 'M = 2' in text and '--components 2' in res['command']
