"""The Triton passes of CompoundBatchNorm2d (kernel='triton', compound_bn_triton).

Without a GPU they run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py),
which executes the same kernel code with NumPy.  Each pass is checked against a float64 transcription of
its equation written with einsum, at tile boundaries of positions, channels and components; the layer's
kernel='triton' against 'gemm' for every option is in tests/test_compound_bn_kernels.py, under DDP in
tests/test_compound_bn_ddp.py.
"""
import copy

import pytest
import torch

from lt_zoo.layers import compound_bn_functional as cbf
from lt_zoo.layers import compound_bn_triton as cbt
from lt_zoo.layers.compound_bn import CompoundBatchNorm2d

# the interpreter on CPU tensors; on a machine with CUDA (conftest leaves TRITON_INTERPRET unset) the GPU
DEVICE = 'cpu' if cbt.interpreting() else 'cuda'


def test_kernels_run_where_the_tests_put_their_tensors():
    """Guards the rest: without CUDA the kernels were defined in interpreter mode, so CPU tensors reach
    the real kernel code."""
    assert cbt.available() and cbt.R_FLOOR == cbf._R_FLOOR
    kind = type(cbt._estep_kernel).__name__
    assert kind == ('InterpretedFunction' if DEVICE == 'cpu' else 'JITFunction'), kind


def _state(m, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = torch.softmax(torch.randn(m, generator=g, dtype=dtype), 0)
    mean = 3 + torch.randn(m, c, generator=g, dtype=dtype)
    var = 0.5 + torch.rand(m, c, generator=g, dtype=dtype)
    shift = 3 + 0.1 * torch.randn(c, generator=g, dtype=dtype)
    coef = cbf.estep_coefficients(prior, mean - shift, var, 1e-5, 1.0)
    A, B, D = (torch.randn(m, c, generator=g, dtype=dtype) for _ in range(3))
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else tuple(u.to(DEVICE) for u in t)
                 for t in (shift, coef, A, B, D))


def _map(n, c, hw, channels_last, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 3 + torch.randn(n, c, *hw, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _reference(x, shift, coef, groups=None, m=None):
    """float64 R (N, M, L), xs (N, C, L): Eq. 8 with einsum (or one-hot groups), r <= 1e-30 zeroed."""
    xs = (x.double() - shift.double().view(1, -1, 1, 1)).flatten(2)
    if groups is not None:
        return torch.nn.functional.one_hot(groups, m).double().unsqueeze(2).expand(-1, -1, xs.shape[2]), xs
    w1, w2, const = (t.double() for t in coef)
    logits = torch.einsum('ncl,kc->nkl', xs, w1) + torch.einsum('ncl,kc->nkl', xs * xs, w2) + const.view(1, -1, 1)
    R = torch.softmax(logits, 1)
    return torch.where(R <= 1e-30, torch.zeros_like(R), R), xs


# (N, C, H, W, M): channels across BLOCK_C = 32 and the moments' 64, positions across BLOCK_P = 32 / 64 and
# across several position groups, one-position maps, components padded to a power of two
SHAPES = [(3, 5, 5, 7, 3), (2, 33, 4, 4, 4), (3, 70, 8, 8, 5), (4, 32, 1, 1, 1), (2, 8, 9, 9, 9)]


@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_passes_equal_a_float64_transcription(shape, channels_last):
    n, c, h, w, m = shape
    x = _map(n, c, (h, w), channels_last)
    shift, coef, A, B, D = _state(m, c)
    g = _map(n, c, (h, w), channels_last, seed=2)
    R_ref, xs = _reference(x, shift, coef)
    R, sums = cbt.estep_moments(x, m, coef, None, shift)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R, R_ref, **tol)
    s_ref = torch.cat([R_ref.sum((0, 2)).unsqueeze(1), (R_ref * R_ref).sum((0, 2)).unsqueeze(1),
                       torch.einsum('nkl,ncl->kc', R_ref, xs), torch.einsum('nkl,ncl->kc', R_ref, xs * xs)], 1)
    torch.testing.assert_close(sums, s_ref, **tol)
    G, H = cbt.grad_moments(x, g, R, shift)
    gf = g.flatten(2)
    torch.testing.assert_close(G, torch.einsum('nkl,ncl->kc', R_ref, gf), **tol)
    torch.testing.assert_close(H, torch.einsum('nkl,ncl->kc', R_ref, gf * xs), **tol)
    mix = lambda coef_: torch.einsum('nkl,kc->ncl', R_ref, coef_)  # noqa: E731
    out = cbt.combine(x, g, R, A, B, D, shift)
    torch.testing.assert_close(out.flatten(2), xs * mix(A) + gf * mix(B) + mix(D), **tol)
    assert out.stride() == x.stride()
    out = cbt.combine(x, None, R, A, None, D, shift)
    torch.testing.assert_close(out.flatten(2), xs * mix(A) + mix(D), **tol)
    ev = cbt.folded_eval(x, coef, A, D, shift)
    torch.testing.assert_close(ev.flatten(2), xs * mix(A) + mix(D), **tol)
    assert ev.stride() == x.stride()


@pytest.mark.parametrize('hw', [(5, 7), (1, 1)])
def test_split_path_sums_count_each_image_at_all_its_positions(hw):
    n, c, m = 5, 6, 4
    x = _map(n, c, hw, False)
    shift, _, A, _, D = _state(m, c)
    groups = torch.tensor([0, 3, 3, 1, 0], device=DEVICE)  # component 2 empty
    R, sums = cbt.estep_moments(x, m, None, groups, shift)
    assert R.shape == (n, m, 1)
    R_ref, xs = _reference(x, shift, None, groups, m)
    counts = torch.tensor([2., 1., 0., 2.], dtype=torch.float64, device=DEVICE) * hw[0] * hw[1]
    torch.testing.assert_close(sums[:, 0], counts)
    torch.testing.assert_close(sums[:, 1], counts)  # one-hot: r^2 = r
    torch.testing.assert_close(sums[:, 2:2 + c], torch.einsum('nkl,ncl->kc', R_ref, xs), rtol=1e-10, atol=1e-10)
    out = cbt.combine(x, None, R, A, None, D, shift)
    torch.testing.assert_close(out.flatten(2), xs * A[groups].unsqueeze(2) + D[groups].unsqueeze(2),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_maps_keep_their_dtype_with_float32_statistics(dtype):
    """A bf16/fp16 activation (the layer runs outside autocast) is read as it is: R and the sums are
    float32, the output keeps the map's dtype, all within the map's own rounding of float64."""
    n, c, hw, m = 4, 40, (6, 6), 4
    x = _map(n, c, hw, True, dtype=dtype)
    shift, coef, A, _, D = _state(m, c, dtype=torch.float32)
    R, sums = cbt.estep_moments(x, m, coef, None, shift)
    assert R.dtype == sums.dtype == torch.float32
    R_ref, xs = _reference(x, shift, coef)  # from the same low-precision values, in float64
    torch.testing.assert_close(R.double(), R_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sums[:, 2:2 + c].double(), torch.einsum('nkl,ncl->kc', R_ref, xs), rtol=1e-4,
                               atol=1e-3)
    out = cbt.combine(x, None, R, A, None, D, shift)
    assert out.dtype == dtype and out.stride() == x.stride()
    ref = xs * torch.einsum('nkl,kc->ncl', R_ref, A.double()) + torch.einsum('nkl,kc->ncl', R_ref, D.double())
    # fp32 arithmetic, then one rounding to the map's dtype: to nearest (half an ulp) for fp16; a GPU rounds
    # fp32 -> bf16 to nearest too, but Triton's interpreter truncates it (a whole ulp)
    eps = torch.finfo(dtype).eps
    rtol = {torch.float16: 0.5 * eps, torch.bfloat16: eps if DEVICE == 'cpu' else 0.5 * eps}.get(dtype, 2 * eps)
    torch.testing.assert_close(out.flatten(2).double(), ref, rtol=rtol, atol=1e-6 * ref.abs().max().item())


def _layer_pair(kernel='triton'):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), CompoundBatchNorm2d(8, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), CompoundBatchNorm2d(8, 3, combine='mn'))
    for mod in net.modules():
        if isinstance(mod, CompoundBatchNorm2d):
            mod.kernel = kernel
    net = net.to(DEVICE)
    return net, copy.deepcopy(net)


@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')  # NumPy, in the interpreter
def test_non_finite_map_gives_gemm_output_and_skips_the_update():
    net, ref = _layer_pair()
    for mod in ref.modules():
        if isinstance(mod, CompoundBatchNorm2d):
            mod.kernel = 'gemm'
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    x[1, 0, 2, 3] = float('nan')
    y, y_ref = net(x), ref(x)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()
    torch.testing.assert_close(y[~y.isnan()], y_ref[~y_ref.isnan()])
    layer = net[1]
    assert layer.num_batches_skipped.item() == 1 and layer.num_batches_tracked.item() == 0


@pytest.mark.slow
def test_compiled_training_uses_the_triton_ops_without_graph_breaks_and_equals_eager():
    """torch.compile (inductor) over two CBN layers with kernel='triton': one graph, the passes as custom-op
    nodes, and three SGD steps equal to eager in outputs, parameters and running buffers; then eval."""
    net, ref = _layer_pair()
    x0 = torch.randn(4, 3, 6, 6, device=DEVICE)
    explain = torch._dynamo.explain(copy.deepcopy(net))(x0)
    assert explain.graph_break_count == 0, explain.break_reasons
    ops = {str(node.target) for gm in explain.graphs for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
           for node in sub.graph.nodes if node.op == 'call_function'}  # autograd.Function bodies: subgraphs
    assert {'lt_zoo.cbn_triton_estep.default', 'lt_zoo.cbn_triton_moments.default',
            'lt_zoo.cbn_triton_combine.default'} <= ops, ops
    compiled = torch.compile(net)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, generator=g).to(DEVICE)
        for model, o in ((compiled, opt), (ref, opt_ref)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for (name, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert net[1].num_batches_tracked.item() == 3
    net.eval(), ref.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 6, 6, generator=g).to(DEVICE)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_triton_kernel_refuses_a_map_it_cannot_take_before_any_work(monkeypatch):
    layer = CompoundBatchNorm2d(4, 2)
    layer.kernel = 'triton'
    state = [t.clone() for t in (layer.running_prior, layer.running_mean, layer.running_var)]
    monkeypatch.setattr(cbt, 'interpreting', lambda: False)  # kernels defined for a GPU
    with pytest.raises(ValueError, match=r"kernel='triton': it needs a CUDA map, got one on cpu"):
        layer(torch.randn(3, 4, 5, 5))
    assert all(torch.equal(a, b) for a, b in zip(state, (layer.running_prior, layer.running_mean, layer.running_var)))
    assert layer.num_batches_tracked.item() == 0
    with pytest.raises(RuntimeError, match="on CPU only in Triton's interpreter"):
        cbt.combine(torch.randn(2, 4, 3, 3), None, torch.rand(2, 2, 9), torch.ones(2, 4), None, torch.ones(2, 4))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"kernel='triton': it takes a 4-D float32/bfloat16/float16/float64 map, "
                                         r"got 4-D torch.int64"):
        cbf.compound_batch_norm(torch.ones(3, 4, 5, 5, dtype=torch.long), layer.running_prior, layer.running_mean,
                                layer.running_var, layer.weight, layer.bias, False, kernel='triton')


@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_triton_custom_ops_pass_torch_library_opcheck(channels_last):
    """The fake implementations (what a compiled graph plans with) agree with the kernels in shape, dtype
    and strides, and the schemas are honest (no input mutated, no output aliasing an input)."""
    n, c, hw, m = 3, 5, (4, 3), 3
    x, g = _map(n, c, hw, channels_last), _map(n, c, hw, channels_last, seed=4)
    shift, coef, A, B, D = _state(m, c)
    R, _ = cbt.estep_moments(x, m, coef, None, shift)
    torch.library.opcheck(cbt._estep_op, (x, shift, *coef))
    torch.library.opcheck(cbt._moments_op, (x, None, shift, R))
    torch.library.opcheck(cbt._moments_op, (x, g, shift, R))
    torch.library.opcheck(cbt._combine_op, (x, g, shift, R, A, B, D))
    torch.library.opcheck(cbt._combine_op, (x.float(), None, shift.float(), R.float(), A, None, D))
    torch.library.opcheck(cbt._eval_op, (x.bfloat16(), shift, *coef, A, D))
    # a dense map in neither standard layout (what a compiled graph may hand a flexible-layout op): computed
    # in a contiguous copy, returned in the strides the fake implementation promised
    odd = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not odd.is_contiguous() and not odd.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(cbt._combine_op, (odd, None, shift, R, A, None, D))
    torch.library.opcheck(cbt._eval_op, (odd, shift, *coef, A, D))
    torch.testing.assert_close(cbt.combine(odd, None, R, A, None, D, shift), cbt.combine(x, None, R, A, None, D, shift))


@pytest.mark.slow  # a process compiling 24 kernels
def test_kernels_compile_for_a_gpu_without_spilling(tmp_path):
    """The interpreter accepts code a GPU compiler may reject: compile every kernel variant ahead of time for
    sm_90 (Triton's own ptxas, no device needed) and check that none spills, via benchmarks/triton_resources.py."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'triton_resources.py'), '--arch', '90',
                           '--components', '4', '--out', str(tmp_path / 'res')], capture_output=True, text=True,
                          timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / 'res.json').read_text())
    rows = res['rows']
    # 4 map dtypes x (E-step, eval, moments with and without g, output pass with and without g)
    assert len(rows) == 24 and res['passed']
    assert {(r['kernel'], r['with_g']) for r in rows} == {
        ('estep_kernel', None), ('estep_kernel (eval)', None), ('moments_kernel', False), ('moments_kernel', True),
        ('combine_kernel', False), ('combine_kernel', True)}
    assert all(r['stack_bytes'] == 0 and 0 < r['registers'] <= 255 and 0 < r['occupancy'] <= 1 for r in rows)


def test_triton_resources_occupancy_counts_registers_per_warp_in_units_of_256():
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.join(root, 'benchmarks') not in sys.path:  # the benchmarks import each other
        sys.path.insert(0, os.path.join(root, 'benchmarks'))
    spec = importlib.util.spec_from_file_location('triton_resources', os.path.join(root, 'benchmarks',
                                                                                    'triton_resources.py'))
    saved = os.environ.get('TRITON_INTERPRET')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # pops TRITON_INTERPRET (lt_zoo, already imported, keeps its kernels)
    if saved is not None:
        os.environ['TRITON_INTERPRET'] = saved
    # 64 registers x 32 threads = 2048 a warp; 8 warps a program -> 4 programs (65,536) -> 32 of 64 warps
    assert mod.occupancy(64, 8) == 0.5
    # 60 rounds up to 64 a thread (2048 a warp, a multiple of 256): the same
    assert mod.occupancy(60, 8) == 0.5
    # 65 -> 2080 -> 2304 a warp: 3 programs of 8 warps
    assert mod.occupancy(65, 8) == 24 / 64
    # 32 registers, 4 warps: the register file allows 16 programs, the 2048-thread limit 16 -> all 64 warps
    assert mod.occupancy(32, 4) == 1.0


@pytest.mark.slow  # a process
def test_triton_resources_refuses_a_bad_tile_before_compiling(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'triton_resources.py'), '--tiles',
                           '64x24w4', '--out', str(tmp_path / 'res')], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert proc.returncode == 1
    assert 'error: --tiles 64x24w4: expected PxCwW' in proc.stderr and list(tmp_path.iterdir()) == []
