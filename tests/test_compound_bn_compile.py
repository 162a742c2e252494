"""torch.compile(fullgraph=True) of CompoundBatchNorm2d equals eager: outputs, gradients, running state."""
import contextlib
import copy
import sys

import pytest
import torch

from lt_zoo.layers.compound_bn import CompoundBatchNorm2d


@pytest.mark.slow
@pytest.mark.parametrize('kernel', ['auto', 'pointwise'], ids=['native_ops', 'pointwise'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_compiled_layer_matches_eager_over_training_steps(channels_last, kernel):
    """'auto' compiles with the native passes as custom ops (CPU), 'pointwise' traces broadcasts and sums
    (what CUDA, DDP and autograd through r compile); eager runs the native passes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = CompoundBatchNorm2d(6, 3, combine='mn')
    compiled_layer = copy.deepcopy(eager)
    compiled_layer.kernel = kernel
    compiled = torch.compile(compiled_layer, fullgraph=True)  # fullgraph: any graph break raises
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(4, 6, 5, 5) * 2 + step).contiguous(memory_format=fmt)
        g = torch.randn(4, 6, 5, 5)
        outs = []
        for layer in (eager, compiled):
            xr = x.clone().requires_grad_()
            y = layer(xr)
            y.backward(g)
            outs.append((y, xr.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        for name in ('running_prior', 'running_mean', 'running_var', 'num_batches_tracked', 'last_counts'):
            torch.testing.assert_close(getattr(compiled_layer, name), getattr(eager, name), rtol=1e-5, atol=1e-5)
        for p, q in zip(eager.parameters(), compiled_layer.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4)
    eager.eval(), compiled_layer.eval()
    x = torch.randn(3, 6, 5, 5).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # spawns a process
@pytest.mark.parametrize('script', ['gpu_speed', 'gpu_exactness', 'gpu_layer_speed'])
def test_gpu_scripts_refuse_without_cuda_in_one_line(script, tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    out = tmp_path / 'res'
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', f'{script}.py'), '--out', str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f'{script}.py: error: no CUDA device' in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # three ResNet-50s on the CPU, in a process
def test_gpu_speed_dry_run_on_cpu_writes_one_row_per_model_relative_to_bn(tmp_path):
    """``--device cpu`` runs the GPU benchmark's code (bf16 autocast, channels_last, the three timm models)
    without a GPU; the result files have one row per model and BN's ratios are 1 by construction."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / 'speed'
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu_speed.py'), '--device', 'cpu',
                           '--modes', 'eager', '--batch', '2', '--size', '32', '--reps', '2', '--warmup', '0',
                           '--out', str(out)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / 'speed.json').read_text())
    assert res['device'] == 'cpu' and list(res['modes']) == ['eager']
    rows = res['modes']['eager']
    assert list(rows) == ['bn', 'nbn', 'cbn_m4']
    assert rows['bn']['train_x_bn'] == 1.0 and rows['bn']['eval_x_bn'] == 1.0
    for v in rows.values():
        assert v['train_img_s'] == pytest.approx(1e3 * 2 / v['train_ms']) and v['graph_breaks'] == 0
        assert v['max_memory_gib'] is None  # CUDA's allocator statistics only
    md = (tmp_path / 'speed.md').read_text()
    assert md.count('| eager |') == 3 and 'wall-clock (a CPU dry run, not a measurement)' in md


def test_gpu_exactness_flags_a_tensor_beyond_its_tolerance_and_says_failed(tmp_path):
    """The exactness report's verdict comes from torch.allclose per tensor: a pair 1e-3 apart fails at
    1e-4 (the row keeps the difference), a pair 1e-5 apart passes, a shape mismatch fails."""
    import argparse
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location('gpu_exactness', os.path.join(root, 'benchmarks', 'gpu_exactness.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = torch.zeros(3, dtype=torch.float64)
    rows = []
    mod._compare('compiled.x', [('far', a + torch.tensor([0, 1e-3, 0]), a), ('near', a + 1e-5, a),
                                ('shape', torch.zeros(2), torch.zeros(3))], 1e-4, 1e-4, rows)
    assert [r['ok'] for r in rows] == [False, True, False]
    assert rows[0]['max_abs_diff'] == pytest.approx(1e-3)
    res = mod.write(rows, argparse.Namespace(device='cpu'), str(tmp_path / 'ex'))
    assert res['passed'] is False
    md = (tmp_path / 'ex.md').read_text()
    assert '**FAILED**' in md and '| compiled.x | 3 | 2 | inf |' in md  # the shape mismatch


@pytest.mark.parametrize('kernel', ['auto', 'pointwise'], ids=['native_ops', 'pointwise'])
@pytest.mark.parametrize('split', [False, True], ids=['compound', 'split'])
def test_compiled_layer_called_twice_before_backward_matches_eager(split, kernel):
    """The dual path runs a network several times before one backward.  A compiled graph must not read
    the running state in its backward (the next call updates it in place).  Call 1 has a component
    normalised with running statistics (a 1x1 map: a single vector in group 3 / an unbalanced soft
    assignment), call 2 updates that component; backend aot_eager_decomp_partition is inductor's
    partitioner without code generation."""
    from lt_zoo.layers.compound_bn import split_norm
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = CompoundBatchNorm2d(5, 4).train()
    compiled_layer = copy.deepcopy(eager)
    compiled_layer.kernel = kernel
    compiled = torch.compile(compiled_layer, backend='aot_eager_decomp_partition', fullgraph=True)
    xs = [torch.randn(8, 5, 1, 1) * 2, torch.randn(8, 5, 1, 1) + 1]
    targets = [torch.tensor([0, 1, 2, 3, 4, 5, 0, 9]), torch.tensor([9, 8, 9, 1, 2, 8, 0, 4])]  # group 3: 1, then 3
    g = [torch.randn(8, 5, 1, 1) for _ in xs]
    grads = []
    for layer in (eager, compiled):
        xr = [x.clone().requires_grad_() for x in xs]
        ys = []
        for x, t in zip(xr, targets):
            with split_norm(layer if layer is eager else compiled_layer, t, 10) if split else contextlib.nullcontext():
                ys.append(layer(x))
        sum((y * gy).sum() for y, gy in zip(ys, g)).backward()
        grads.append([x.grad for x in xr] + ys)
    # atol 1e-4: groups of 2-3 vectors have tiny variances, and every kernel (GEMM, native, pointwise) is
    # 2.2e-5 from a float64 run on the input gradient here; reading stale running state is off by O(1)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for p, q in zip(eager.parameters(), compiled_layer.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    for name in ('running_prior', 'running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(compiled_layer, name), getattr(eager, name), rtol=1e-5, atol=1e-6)


def test_compiled_graph_calls_the_native_passes_as_custom_ops_on_cpu():
    """On CPU the traced graph holds lt_zoo::cbn_native_train (training) and lt_zoo::cbn_cpp_eval_running
    (eval, the C++ kernel, built here) as single nodes, not the broadcasts of the pointwise formulation; with
    kernel='pointwise' it does not, and only the pointwise graph copies the running state
    (lt_zoo::cbn_state_copy) for its backward."""
    from lt_zoo.layers import compound_bn_torch
    assert compound_bn_torch.available()  # a C++ compiler and ninja (a dependency) are all it needs
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    for kernel, expect in (('auto', True), ('pointwise', False)):
        torch._dynamo.reset()
        graphs.clear()
        layer = CompoundBatchNorm2d(4, 2)
        layer.kernel = kernel
        compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)
        compiled(torch.randn(3, 4, 5, 5, requires_grad=True)).sum().backward()
        layer.eval()
        with torch.no_grad():
            compiled(torch.randn(3, 4, 5, 5))
        text = '\n'.join(graphs)
        assert ('cbn_native_train' in text) == expect and ('cbn_cpp_eval_running' in text) == expect, text
        assert 'cbn_native_eval_running' not in text, text
        # the native op's backward reads only its outputs: no copy of the running state for it
        assert ('cbn_state_copy' in text) == (not expect), text


@pytest.mark.parametrize('groups', [False, True], ids=['compound', 'split'])
def test_native_custom_ops_pass_torch_library_opcheck(groups):
    """Fake (meta) shapes, strides and the registered autograd of the custom ops agree with the real ones."""
    from lt_zoo.layers import compound_bn_ops
    torch.manual_seed(0)
    m, c = 3, 4
    x = torch.randn(5, c, 3, 4, dtype=torch.float64, requires_grad=True)
    args = (x, torch.full((m,), 1 / m, dtype=torch.float64),
            0.1 * torch.randn(m, c, dtype=torch.float64), 1 + torch.rand(m, c, dtype=torch.float64),
            torch.randn(m, c, dtype=torch.float64, requires_grad=True),
            torch.randn(m, c, dtype=torch.float64, requires_grad=True),
            torch.tensor([0, 1, 2, 0, 1]) if groups else None, 1e-5, 1.0, 1.0, not groups)
    torch.library.opcheck(compound_bn_ops._train_op, args)
    folded = [torch.randn(m, c, dtype=torch.float64), -torch.rand(m, c, dtype=torch.float64),
              torch.randn(m, dtype=torch.float64), torch.randn(m, c, dtype=torch.float64),
              torch.randn(m, c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)]
    torch.library.opcheck(compound_bn_ops.eval_forward, (x.detach(), *folded))
    for op in (compound_bn_ops.eval_running_py, compound_bn_ops.eval_running_cpp):
        torch.library.opcheck(op, (x.detach(), *args[1:4], args[4].detach(), args[5].detach(), 1e-5, 2.0, not groups))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('m', [1, 4, 9])
def test_cpp_eval_op_returns_the_python_ops_numbers_in_the_inputs_strides(dtype, m):
    """lt_zoo::cbn_cpp_eval_running (C++ kernel) and lt_zoo::cbn_native_eval_running (Python kernel) call the
    same native pass: bitwise the same output, in the input's strides, for a contiguous, a channels_last and
    a permuted map (copied to a standard layout inside), statistics in another dtype, both combine rules."""
    from lt_zoo.layers import compound_bn_ops, compound_bn_torch
    assert compound_bn_torch.available()
    torch.manual_seed(0)
    c = 16
    base = torch.randn(3, c, 5, 7, dtype=dtype)
    stats = (torch.full((m,), 1 / m), 0.3 * torch.randn(m, c), 0.5 + torch.rand(m, c), torch.randn(m, c),
             torch.randn(m, c))
    stats = tuple(t.to(torch.float64 if dtype == torch.float32 else torch.float32) for t in stats)
    for x in (base, base.contiguous(memory_format=torch.channels_last), base.permute(0, 1, 3, 2)):
        for mn in (False, True):
            want = compound_bn_ops.eval_running_py(x, *stats, 1e-5, 2.0, mn)
            got = compound_bn_ops.eval_running_cpp(x, *stats, 1e-5, 2.0, mn)
            assert got.dtype == dtype and got.stride() == x.stride() and torch.isfinite(got).all()
            assert torch.equal(got, want)


def test_cpp_eval_op_refuses_a_map_it_cannot_take():
    from lt_zoo.layers import compound_bn_ops, compound_bn_torch
    assert compound_bn_torch.available()
    stats = (torch.full((2,), 0.5), torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match='expected a 4-D float32/float64 map, got 4-D Half'):
        compound_bn_ops.eval_running_cpp(torch.zeros(1, 4, 2, 2, dtype=torch.float16), *stats, 1e-5, 1.0, False)


def test_without_ninja_the_cpp_eval_op_is_off_with_one_warning_and_graphs_call_the_python_kernel(monkeypatch):
    """No ninja (torch's own check fails before any build): available() is False with a warning naming the
    cause, and compound_bn_ops.eval_running runs the Python kernel, with the same output."""
    from torch.utils import cpp_extension
    from lt_zoo.layers import compound_bn_ops, compound_bn_torch

    def no_ninja():
        raise RuntimeError('Ninja is required to load C++ extensions')
    monkeypatch.setattr(compound_bn_torch, '_state', None)
    monkeypatch.setattr(compound_bn_torch.shutil, 'which', lambda name: None)
    monkeypatch.setitem(sys.modules, 'ninja', None)  # the pip package's binary is not there either
    monkeypatch.setattr(cpp_extension, 'verify_ninja_availability', no_ninja)
    with pytest.warns(RuntimeWarning, match='C\\+\\+ eval op of CompoundBatchNorm2d is off .*Ninja is required'):
        assert not compound_bn_torch.available()
    assert not compound_bn_torch.available()  # decided once
    x = torch.randn(2, 4, 3, 3)
    stats = (torch.full((2,), 0.5), 0.1 * torch.randn(2, 4), torch.ones(2, 4), torch.ones(2, 4), torch.zeros(2, 4))
    torch.testing.assert_close(compound_bn_ops.eval_running(x, *stats, 1e-5, 1.0, False),
                               compound_bn_ops.eval_running_py(x, *stats, 1e-5, 1.0, False), rtol=0, atol=0)


def _load_benchmark(name):
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.join(root, 'benchmarks') not in sys.path:  # the benchmarks import each other
        sys.path.insert(0, os.path.join(root, 'benchmarks'))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'benchmarks', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_layer_speed_reads_resnet50s_53_norm_shapes_and_sums_layers_times_ms():
    """ResNet-50 at 224: 53 norm layers of 12 shapes, counted by hand from its stages (stem 64x112x112;
    per stage of width w, blocks b and map s: b x (w, s) twice, minus the first block's first norm, which
    sees the previous stage's map, and b + 1 x (4w, s) with the downsample)."""
    mod = _load_benchmark('gpu_layer_speed')
    shapes = mod.resnet50_norm_shapes(224)
    assert sum(shapes.values()) == 53 and len(shapes) == 12
    assert shapes[(64, 112, 112)] == 1 and shapes[(64, 56, 56)] == 6 and shapes[(256, 56, 56)] == 4
    assert shapes[(128, 56, 56)] == 1 and shapes[(128, 28, 28)] == 7 and shapes[(512, 28, 28)] == 5
    assert shapes[(256, 14, 14)] == 11 and shapes[(1024, 14, 14)] == 7 and shapes[(2048, 7, 7)] == 4
    chosen, covered = mod.pick_shapes(shapes, 1)
    total = sum(n * c * h * w for (c, h, w), n in shapes.items())
    assert chosen == [(256, 56, 56)] and covered == pytest.approx(4 * 256 * 56 * 56 / total)
    assert mod.pick_shapes(shapes, 12)[1] == pytest.approx(1.0)
    res = {'modes': {'eager': {'bn': {'a': {'train_ms': 1.0, 'eval_ms': 0.5}, 'b': {'train_ms': 2.0, 'eval_ms': 1.0}},
                               'gemm': {'a': {'train_ms': 3.0, 'eval_ms': 1.0}, 'b': {'train_ms': 2.0, 'eval_ms': 4.0}}}},
           'summary': {}}
    mod.summarise(res, {'a': 2, 'b': 5})
    s = res['summary']['eager']
    assert s['bn']['train_network_ms'] == 12.0 and s['gemm']['train_network_ms'] == 16.0  # 2 x 3 + 5 x 2
    assert s['gemm']['train_x_bn'] == pytest.approx(16 / 12) and s['gemm']['eval_x_bn'] == pytest.approx(22 / 6)


@pytest.mark.slow  # a process
def test_gpu_layer_speed_refuses_a_base_that_is_neither_a_folder_nor_a_revision(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu_layer_speed.py'), '--device', 'cpu',
                           '--base', 'no-such-rev', '--out', str(tmp_path / 'res')], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 1
    assert "--base 'no-such-rev' is neither a folder with an lt_zoo/ package nor a git revision" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # two processes, a few layers each
def test_gpu_layer_speed_dry_run_times_this_tree_and_a_base_folder_per_shape(tmp_path):
    """``--device cpu --base DIR``: BN and every kernel of this tree (Triton's in its interpreter), then the
    base folder's CBN (``--base_kernels``: gemm and pointwise) in a child process whose ``lt_zoo`` is the
    folder's (a copy of this tree's package with a marker: the child must import it, not the installed
    one), one row per shape and variant, summed over the layers of each shape."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tmp_path / 'base'
    shutil.copytree(os.path.join(root, 'lt_zoo'), base / 'lt_zoo', ignore=shutil.ignore_patterns('__pycache__'))
    with open(base / 'lt_zoo' / 'layers' / 'compound_bn.py', 'a') as f:  # what the child imported, made visible
        f.write("\nimport os as _os\nopen(_os.environ['BASE_MARK'], 'w').write(__file__)\n")
    mark = tmp_path / 'mark.txt'
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu_layer_speed.py'), '--device', 'cpu',
                           '--modes', 'eager', '--top', '2', '--size', '32', '--batch', '2', '--reps', '1',
                           '--warmup', '0', '--base', str(base), '--out', str(tmp_path / 'res')],
                          capture_output=True, text=True, timeout=600, cwd=root, env=dict(os.environ, BASE_MARK=str(mark)))
    assert proc.returncode == 0, proc.stderr
    assert mark.read_text() == str(base / 'lt_zoo' / 'layers' / 'compound_bn.py')
    res = json.loads((tmp_path / 'res.json').read_text())
    rows = res['modes']['eager']
    assert list(rows) == ['bn', 'gemm', 'pointwise', 'triton', 'base:gemm', 'base:pointwise']
    assert all(list(r) == list(res['counts']) for r in rows.values()) and len(res['counts']) == 2
    for variant, r in rows.items():
        total = sum(res['counts'][k] * v['train_ms'] for k, v in r.items())
        assert res['summary']['eager'][variant]['train_network_ms'] == pytest.approx(total)
    assert res['summary']['eager']['bn']['train_x_bn'] == 1.0


def test_gpu_layer_speed_triton_tiles_set_every_pass_and_are_restored():
    from lt_zoo.layers import compound_bn_triton as cbt
    mod = _load_benchmark('gpu_layer_speed')
    assert mod.parse_tiles('64x32w4') == (64, 32, 4)
    for bad in ('64x32', '48x32w4', '64x512w4', '64x32w3', '8x32w4', 'x32w4'):
        assert mod.parse_tiles(bad) is None, bad
    names = ('_BLOCK_P', '_BLOCK_C', '_COMBINE_P', '_COMBINE_C', '_MOMENT_P', '_MOMENT_C', '_WARPS')
    before = [getattr(cbt, n) for n in names]
    with mod.triton_tiles('triton@128x16w2'):
        assert [getattr(cbt, n) for n in names] == [128, 16, 128, 16, 128, 16, 2]
        assert mod.make_layer('triton@128x16w2', 8, 'cpu').kernel == 'triton'
    assert [getattr(cbt, n) for n in names] == before
    with mod.triton_tiles('pointwise'):
        assert [getattr(cbt, n) for n in names] == before


@pytest.mark.slow  # a process
def test_gpu_layer_speed_refuses_bad_triton_tiles_before_any_work(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu_layer_speed.py'), '--device', 'cpu',
                           '--triton_tiles', '64x32w4', '48x32w4', '--out', str(tmp_path / 'res')],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 1
    assert 'error: --triton_tiles 48x32w4: expected PxCwW with P and C powers of two' in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cpp_eval_op_links_the_native_library_this_process_loaded(monkeypatch, tmp_path):
    """Once the native library is loaded, its source may change on disk (an edit, a checkout): library_path()
    then names a file that was never built.  The C++ op is built for, and pointed at, the loaded file."""
    from lt_zoo.layers import compound_bn_native, compound_bn_ops, compound_bn_torch
    assert compound_bn_native.available()
    loaded = compound_bn_native.loaded_path()
    assert loaded.is_file() and loaded.name.startswith('compound_bn_cpu-')
    monkeypatch.setattr(compound_bn_native, 'library_path', lambda: tmp_path / 'compound_bn_cpu-never-built.so')
    monkeypatch.setattr(compound_bn_torch, '_state', None)
    assert compound_bn_torch.available()
    assert compound_bn_torch.build_directory(loaded).is_dir()
    x = torch.randn(2, 4, 3, 3)
    stats = (torch.full((2,), 0.5), 0.1 * torch.randn(2, 4), torch.ones(2, 4), torch.ones(2, 4), torch.zeros(2, 4))
    assert torch.equal(compound_bn_ops.eval_running_cpp(x, *stats, 1e-5, 1.0, False),
                       compound_bn_ops.eval_running_py(x, *stats, 1e-5, 1.0, False))
