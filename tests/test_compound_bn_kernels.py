"""The formulations of the CBN kernel agree to float64 rounding: the batched-GEMM one with its analytic
backward, the broadcast-and-sum one differentiated by autograd (what torch.compile traces), the native
C++ passes with the GEMM one's analytic backward (the eager default on CPU) and the Triton passes with
the same backward (run here in Triton's interpreter, tests/conftest.py).  Every option of the layer,
both memory formats, training and eval."""
import itertools

import pytest
import torch

from lt_zoo.layers import compound_bn_functional as cbf

OPTIONS = [dict(temperature=t, combine=c, train_stats=s, responsibility_grad=g)
           for t, c, s, g in itertools.product((1.0, 5.0), ('posterior', 'mn'), ('batch', 'running'), (False, True))]


def _case(seed, m=4, c=6, dtype=torch.float64, channels_last=False, hw=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, c, *hw, generator=g, dtype=dtype) * 3 + 50  # |mean| >> std: the shift matters
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    prior = torch.softmax(torch.randn(m, generator=g, dtype=dtype), 0)
    mean = 50 + 2 * torch.randn(m, c, generator=g, dtype=dtype)
    var = 4 + 5 * torch.rand(m, c, generator=g, dtype=dtype)
    weight = 1 + 0.3 * torch.randn(m, c, generator=g, dtype=dtype)
    bias = 0.3 * torch.randn(m, c, generator=g, dtype=dtype)
    gy = torch.randn(x.shape, generator=g, dtype=dtype)
    return x, prior, mean, var, weight, bias, gy


def _run(kernel, case, training, groups=None, **opts):
    x, prior, mean, var, weight, bias, gy = case
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y, stats = cbf.compound_batch_norm(x, prior, mean, var, weight, bias, training, 1e-5, groups=groups,
                                       kernel=kernel, **opts)
    grads = torch.autograd.grad(y, (x, weight, bias), gy)
    return [y, *grads] + ([] if stats is None else list(stats))


@pytest.mark.parametrize('kernel', ['pointwise', 'native', 'triton'])
@pytest.mark.parametrize('opts', OPTIONS, ids=lambda o: '-'.join(str(v) for v in o.values()))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_kernel_equals_gemm_kernel_in_float64(opts, training, kernel):
    for seed, cl in ((0, False), (1, True)):
        case = _case(seed, channels_last=cl)
        gemm, pointwise = _run('gemm', case, training, **opts), _run(kernel, case, training, **opts)
        assert len(gemm) == len(pointwise) == (9 if training else 4)
        assert pointwise[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for a, b in zip(gemm, pointwise):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('kernel', ['pointwise', 'native', 'triton'])
@pytest.mark.parametrize('hw', [(5, 4), (1, 1), (7, 5)], ids=['map', '1x1', 'two_tiles'])
def test_kernel_equals_gemm_kernel_on_the_split_path(hw, kernel):
    groups = torch.tensor([0, 0, 1, 3, 3, 3])  # component 2 empty: normalised with its running statistics
    for cl in (False, True):
        case = _case(2, hw=hw, channels_last=cl)
        gemm, pointwise = _run('gemm', case, True, groups), _run(kernel, case, True, groups)
        for a, b in zip(gemm, pointwise):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_pointwise_training_gradient_is_the_gradient_with_constant_responsibilities():
    """Independent of either kernel: autograd through a direct float64 transcription of Eq. 7-16 with r
    detached, and with the batch statistics of each component."""
    x, prior, mean, var, weight, bias, gy = _case(3, m=3, c=5)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    v = x.permute(0, 2, 3, 1).reshape(-1, 5)  # P x C
    logp = prior.log() - 0.5 * (var.log().sum(1) + (((v[:, None, :] - mean) ** 2) / var).sum(2))
    r = torch.softmax(logp, 1).detach()
    nk = r.sum(0)
    mu = (r.t() @ v) / nk[:, None]
    sig2 = torch.stack([(r[:, k:k + 1] * (v - mu[k]) ** 2).sum(0) / nk[k] for k in range(3)])
    out = sum(r[:, k:k + 1] * (weight[k] * (v - mu[k]) / torch.sqrt(sig2[k] + 1e-5) + bias[k]) for k in range(3))
    y_ref = out.reshape(6, 5, 4, 5).permute(0, 3, 1, 2)
    ref = [y_ref, *torch.autograd.grad(y_ref, (x, weight, bias), gy)]
    got = _run('pointwise', (x.detach(), prior, mean, var, weight.detach(), bias.detach(), gy), True)[:4]
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_unknown_kernel_is_refused_before_any_work():
    x, prior, mean, var, weight, bias, _ = _case(0)
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'gemm', 'pointwise', 'native', 'triton'\), "
                                         r"got 'fused'"):
        cbf.compound_batch_norm(x, prior, mean, var, weight, bias, True, kernel='fused')


@pytest.mark.parametrize('positions', [lambda t: 1, lambda t: t, lambda t: t + 3, lambda t: 2 * t,
                                       lambda t: 6 * t - 1],
                         ids=['1x1', 'one_vector', 'ragged', 'two_vectors', 'six_vectors'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels', [5, 16, 48])
def test_native_kernel_matches_gemm_at_every_tile_boundary(positions, dtype, channels):
    """The native passes walk the map in tiles of U vectors of T positions, T the lanes of one vector
    register of the CPU and U = 2 (1 with AVX-512; the library reports both); maps below, at and across
    a vector's and a tile's boundary (one vector: a tile whose second vector is empty), in float32 (the
    training dtype; GEMM summation order differs) and float64.  With 16 and 48 channels (multiples of
    every T) a channels_last tile is transposed in registers in T x T blocks: one or three blocks for
    AVX-512's float32 T = 16, two or six for AVX2's float32 T = 8; 5 channels fall back to a scalar copy."""
    from lt_zoo.layers import compound_bn_native
    t = compound_bn_native.tile_positions(dtype)
    assert t in (2, 4, 8, 16) and t * dtype.itemsize in (16, 32, 64)  # one SSE, AVX or AVX-512 register
    assert compound_bn_native.tile_vectors(dtype) == (1 if t * dtype.itemsize == 64 else 2)
    hw = (1, positions(t))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for cl in (False, True):
        case = _case(4, c=channels, hw=hw, channels_last=cl, dtype=dtype)
        for training in (True, False):
            gemm, native = _run('gemm', case, training), _run('native', case, training)
            for a, b in zip(gemm, native):
                torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize('m', [1, 3, 8, 9, 12])
def test_native_kernel_matches_gemm_for_every_number_of_components(m):
    """The native passes are compiled with M = 1..8 known (unrolled) and read M at run time above that;
    both paths, training (output, gradients, statistics) and eval, float64, both layouts; 16 channels on
    channels_last (a multiple of every T: the output and input gradient position by position)."""
    for cl, c in ((False, 5), (True, 5), (True, 16)):
        case = _case(6, m=m, c=c, hw=(3, 7), channels_last=cl)
        for training in (True, False):
            for a, b in zip(_run('gemm', case, training), _run('native', case, training)):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('temperature', [1.0, 5.0])
@pytest.mark.parametrize('combine', ['posterior', 'mn'])
def test_native_fold_equals_the_torch_fold_in_float64(temperature, combine):
    """Eval constants: one native call (a module in eval without gradients) against fold_running's torch ops."""
    x, prior, mean, var, weight, bias, _ = _case(7)
    ref = cbf.fold_running(prior, mean, var, weight, bias, 1e-5, temperature, combine)
    got = cbf.fold_running(prior, mean, var, weight, bias, 1e-5, temperature, combine, 'native', x)
    for name, a, b in zip(cbf.FoldedEval._fields, ref, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize('m', [1, 2, 4, 9])
@pytest.mark.parametrize('combine', ['posterior', 'mn'])
def test_native_eval_pass_equals_gemm_without_gradients(m, combine):
    """Eval without gradients (a module in eval under no_grad, and the compiled op) runs the native pass,
    whose E-step works on logits relative to component 0 and whose mix adds r_k (A_k - A_0) to A_0: the
    folded-constants entry and the running-state entry against the GEMM formulation, float64, both
    layouts, maps within, at and across tile boundaries, 16 channels (in-register transposes) and 5."""
    from lt_zoo.layers import compound_bn_native
    t = compound_bn_native.tile_positions(torch.float64)
    for cl, c, hw in ((False, 5, (1, t + 3)), (True, 16, (2, t)), (True, 5, (5, 4)), (False, 16, (1, 1))):
        x, prior, mean, var, weight, bias, _ = _case(8, m=m, c=c, hw=hw, channels_last=cl)
        with torch.no_grad():
            f = cbf.fold_running(prior, mean, var, weight, bias, 1e-5, 2.0, combine)  # torch ops
            ref = cbf.compound_norm_eval(x, f, kernel='gemm')
            folded = cbf.compound_norm_eval(x, f, kernel='native')
            running = compound_bn_native.eval_running(x, prior, mean, var, weight, bias, 1e-5, 2.0, combine == 'mn')
        r = cbf.responsibilities(x, prior, mean, var, 1e-5, 2.0)
        assert m == 1 or ((r > 0.01) & (r < 0.99)).float().mean() > 0.25  # mixed posteriors: the mix matters
        for got in (folded, running):
            assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_native_running_update_equals_the_torch_update(monkeypatch):
    """CompoundBatchNorm2d's EMA of prior, mean and variance, counters and last counts: native call
    against the torch ops ('gemm' layer), float64, over batches that include a split-path step (prior
    kept), an inactive component and a batch with an inf (nothing but num_batches_skipped changes)."""
    from lt_zoo.layers import compound_bn_native
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d, split_norm
    calls, update = [], compound_bn_native.running_update
    monkeypatch.setattr(compound_bn_native, 'running_update', lambda *a, **k: calls.append(update(*a, **k)) or calls[-1])
    torch.manual_seed(0)
    layers = {k: CompoundBatchNorm2d(5, 3, momentum=0.3).double() for k in ('native', 'gemm')}
    layers['gemm'].load_state_dict(layers['native'].state_dict())
    for name, layer in layers.items():
        layer.kernel = name
    batches = [torch.randn(4, 5, 3, 3, dtype=torch.float64) * s + o for s, o in ((1, 0), (2, 3), (1, -1))]
    batches.append(batches[0].clone().index_put_((torch.tensor([0]),), torch.tensor(float('inf'), dtype=torch.float64)))
    for x in batches:
        for layer in layers.values():
            layer(x)
    targets = torch.tensor([0, 0, 0, 0])  # one group: two components see no image (inactive)
    for layer in layers.values():
        with split_norm(layer, targets, num_classes=3):
            layer(batches[1])
    assert calls == [True] * 5  # the native layer's five updates ran natively, the gemm layer's in torch
    assert layers['native'].running_mean._version == 5  # each update counts as an in-place write
    a, b = dict(layers['native'].named_buffers()), dict(layers['gemm'].named_buffers())
    assert int(a['num_batches_skipped']) == 1 and int(a['num_batches_tracked']) == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)


def test_native_training_step_is_one_foreign_call_per_direction_and_the_per_pass_route_agrees(monkeypatch):
    """Without DDP a native training step is one call forward (train_forward) and one backward
    (train_backward); the per-pass route (what DDP runs, the sums all-reduced between passes) gives the
    same output, gradients and statistics, float64, both layouts, split path and 'mn' included."""
    from lt_zoo.layers import compound_bn_native
    calls = []
    for name in ('train_forward', 'train_backward', 'estep_moments', 'combine', 'grad_moments'):
        fn = getattr(compound_bn_native, name)
        monkeypatch.setattr(compound_bn_native, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    for cl, groups, combine in ((False, None, 'posterior'), (True, None, 'mn'), (True, torch.tensor([0, 2, 2, 1, 0, 0]),
                                                                               'posterior')):
        case = _case(8, channels_last=cl)
        calls.clear()
        fused = _run('native', case, True, groups, combine=combine)
        assert calls == ['train_forward', 'train_backward']
        x, prior, mean, var, weight, bias, gy = case
        x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
        shift = cbf.batch_shift(x, False)
        calls.clear()
        y, *st = cbf._ConstantAssignmentNorm.apply(x, weight, bias, prior, mean - shift, var, groups, 1e-5, 1.0,
                                                   combine, False, 'native', shift)
        per_pass = [y, *torch.autograd.grad(y, (x, weight, bias), gy), st[0], st[1], st[2] + shift, st[3], st[4]]
        assert calls == ['estep_moments', 'combine', 'grad_moments', 'combine']
        for name, a, b in zip(('y', 'dx', 'dweight', 'dbias') + cbf.BatchStats._fields, per_pass, fused):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('train_stats', ['batch', 'running'])
@pytest.mark.parametrize('combine', ['posterior', 'mn'])
def test_native_training_forward_without_gradients_equals_gemm(train_stats, combine):
    """A training forward under no_grad (BN recalibration, a frozen backbone) takes the one-call native path
    with the batch or the running statistics; output and statistics as the GEMM formulation's."""
    for cl in (False, True):
        x, prior, mean, var, weight, bias, _ = _case(9, channels_last=cl)
        with torch.no_grad():
            got = cbf.compound_batch_norm(x, prior, mean, var, weight, bias, True, 1e-5, combine=combine,
                                          train_stats=train_stats, kernel='native')
            ref = cbf.compound_batch_norm(x, prior, mean, var, weight, bias, True, 1e-5, combine=combine,
                                          train_stats=train_stats, kernel='gemm')
        assert got[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for a, b in zip((ref[0], *ref[1]), (got[0], *got[1])):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_native_kernel_splits_the_batch_over_threads_without_changing_the_result():
    """One slice of images per torch thread: the same outputs, gradients and statistics as one thread."""
    threads = torch.get_num_threads()
    case = _case(5, c=5, hw=(6, 6), channels_last=True)
    try:
        torch.set_num_threads(1)
        one = _run('native', case, True)
        torch.set_num_threads(4)  # more slices than this machine has cores: the split, not the speed
        four = _run('native', case, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, four):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_auto_kernel_runs_natively_on_cpu_and_falls_back_when_turned_off_or_unbuildable(tmp_path):
    """'auto' uses the native kernel where it is built; LT_ZOO_NATIVE=0 turns it off quietly, a compiler that
    fails turns it off with one warning; both keep the GEMM results, and an explicit 'native' then refuses."""
    import os
    import subprocess
    import sys
    from lt_zoo.layers import compound_bn_native
    assert compound_bn_native.available()  # CI has a C++ compiler: the default must be the fast path
    code = (
        "import warnings, torch\n"
        "from lt_zoo.layers import compound_bn_functional as cbf, compound_bn_native as nat\n"
        "x = torch.randn(4, 3, 5, 5, dtype=torch.float64)\n"
        "p, m, v = torch.full((2,), .5, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), "
        "torch.ones(2, 3, dtype=torch.float64)\n"
        "w, b = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = cbf.compound_batch_norm(x, p, m, v, w, b, True, kernel='auto')[0]\n"
        "ref = cbf.compound_batch_norm(x, p, m, v, w, b, True, kernel='gemm')[0]\n"
        "assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10)\n"
        "print('native', nat.available(), 'warnings', len(caught), [str(c.message)[:60] for c in caught])\n"
        "try:\n    cbf.compound_batch_norm(x, p, m, v, w, b, True, kernel='native')\n"
        "except RuntimeError as e:\n    print('refused:', e)\n")
    base = dict(os.environ, LT_ZOO_KERNEL_CACHE=str(tmp_path / 'cache'))
    off = subprocess.run([sys.executable, '-c', code], env=dict(base, LT_ZOO_NATIVE='0'), capture_output=True,
                         text=True)
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith('native False warnings 0') and "refused: kernel='native'" in off.stdout
    broken = subprocess.run([sys.executable, '-c', code], env=dict(base, CXX='false'), capture_output=True,
                            text=True)
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.startswith('native False warnings 1') and 'native CPU kernel of CompoundBatchNorm2d is off' \
        in broken.stdout and "refused: kernel='native'" in broken.stdout
    assert not any((tmp_path / 'cache').glob('*.so'))  # nothing half-built left in the cache


def test_layer_kernel_attribute_selects_the_formulation_and_is_not_state():
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    torch.manual_seed(0)
    layers = [CompoundBatchNorm2d(5, 3).double() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    layers[1].kernel = 'gemm'
    assert layers[0].kernel == 'auto' and 'kernel' not in ''.join(layers[0].state_dict())
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    for training in (True, False):
        ys = [layer.train(training)(x) for layer in layers]
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-10, atol=1e-10)
    layers[1].kernel = 'fused'
    for training in (True, False):
        with torch.no_grad(), pytest.raises(ValueError, match="kernel must be one of"):
            layers[1].train(training)(x)
