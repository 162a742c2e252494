"""Compound BN on a GPU computes what it computes on the CPU: eager CUDA against a float64 CPU run, and
``torch.compile`` (inductor's Triton kernels) against eager CUDA, over training steps and in eval.

    python benchmarks/gpu_exactness.py [--device cuda] [--kernels auto triton] [--out benchmarks/results/gpu_exactness]

The CPU suite proves compiled == eager on the CPU (tests/test_compound_bn_compile.py).  On CUDA the layer
runs other code: eager takes the GEMM formulation (cuBLAS), a compiled graph the pointwise one (Triton
kernels that inductor generates), and the native CPU kernel takes no part; ``kernel='triton'`` runs
lt_zoo's own Triton passes eager and compiled (checks named ``<check>.triton.*``).  Each check runs three
training steps (forward, backward, running-state update) on the same inputs and then one eval forward,
and compares outputs, input and parameter gradients and the running buffers:

- ``float64``: eager CUDA fp32 against the layer in float64 on the CPU (rtol = atol = 1e-4, as the CPU
  suite's fp32-against-float64 checks), for ``combine`` 'posterior' and 'mn', contiguous and
  channels_last, and the class-aware split path;
- ``compiled``: ``torch.compile(fullgraph=True)`` on CUDA against eager CUDA (the CPU suite's tolerances:
  1e-4 for maps and gradients, 1e-5 for running buffers);
- ``bf16``: a bf16 map under bf16 autocast gives a bf16 output within bf16 rounding (rtol = atol = 2e-2)
  of the fp32 layer on the same values, with fp32 running buffers.

Writes ``<out>.json`` and ``<out>.md`` with the largest difference of every compared tensor and exits 1
if any exceeds its tolerance.  ``--device cpu`` (with ``LT_ZOO_NATIVE=0`` for CUDA's formulations) is a
dry run of the script itself.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUFFERS = ('running_prior', 'running_mean', 'running_var', 'num_batches_tracked', 'last_counts')
STEPS = 3
KERNELS = ('auto', 'triton')  # the layer's own choice on CUDA, and the Triton passes
CHANNELS, COMPONENTS, NUM_CLASSES = 16, 4, 10


def _inputs(step: int, fmt, gen: torch.Generator):
    """float64 CPU map (8, C, 6, 6) drifting with the step, its upstream gradient and split-path targets."""
    x = (torch.randn(8, CHANNELS, 6, 6, generator=gen, dtype=torch.float64) * 2 + step).contiguous(memory_format=fmt)
    g = torch.randn(8, CHANNELS, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
    return x, g, t


def _step(layer, module, x, g, targets):
    """One training forward + backward of ``layer`` (``module`` is the CompoundBatchNorm2d inside it):
    (output, input gradient) detached."""
    from lt_zoo.layers.compound_bn import split_norm
    xr = x.clone().requires_grad_()
    ctx = split_norm(module, targets, NUM_CLASSES) if targets is not None else contextlib.nullcontext()
    with ctx:
        y = layer(xr)
    y.backward(g)
    return y.detach(), xr.grad


def _compare(name, pairs, rtol, atol, rows):
    """Append one row per (label, got, expected): the largest |got - expected|, and whether every element
    is within atol + rtol * |expected| (torch.allclose, the bound of torch.testing.assert_close)."""
    for label, got, want in pairs:
        got_c, want_c = got.detach().cpu().double(), want.detach().cpu().double()
        same = got.shape == want.shape
        ok = same and bool(torch.allclose(got_c, want_c, rtol=rtol, atol=atol))
        diff = (got_c - want_c).abs().max().item() if same else float('inf')
        rows.append({'check': name, 'tensor': label, 'max_abs_diff': diff, 'rtol': rtol, 'atol': atol,
                     'dtype': str(got.dtype).replace('torch.', ''), 'ok': ok})


def _run_pair(name, test, reference, device, ref_device, ref_dtype, fmt, split, rtol, atol, buf_tol, rows):
    """Train ``test`` = (callable, its CompoundBatchNorm2d) on ``device`` and ``reference`` on ``ref_device`` in
    ``ref_dtype`` side by side."""
    gen = torch.Generator().manual_seed(0)
    test_layer, test_module = test
    for step in range(STEPS):
        x, g, t = _inputs(step, fmt, gen)
        y_ref, gx_ref = _step(reference, reference, x.to(ref_device, ref_dtype), g.to(ref_device, ref_dtype),
                              t if split else None)
        y, gx = _step(test_layer, test_module, x.to(device, torch.float32), g.to(device, torch.float32),
                      t.to(device) if split else None)
        _compare(name, [(f'step{step}.output', y, y_ref), (f'step{step}.input_grad', gx, gx_ref)], rtol, atol, rows)
    _compare(name, [(f'{p}.grad', getattr(test_module, p).grad, getattr(reference, p).grad)
                    for p in ('weight', 'bias')], rtol, atol, rows)
    _compare(name, [(b, getattr(test_module, b), getattr(reference, b)) for b in BUFFERS if b != 'num_batches_tracked'],
             buf_tol, buf_tol, rows)
    counts = int(test_module.num_batches_tracked), int(reference.num_batches_tracked)
    rows.append({'check': name, 'tensor': 'num_batches_tracked', 'max_abs_diff': float(abs(counts[0] - counts[1])),
                 'rtol': 0, 'atol': 0, 'dtype': 'int64', 'ok': counts[0] == counts[1] == STEPS})
    test_module.eval(), reference.eval()
    x, _, _ = _inputs(STEPS, fmt, gen)
    with torch.no_grad():
        got, want = test_layer(x.to(device, torch.float32)), reference(x.to(ref_device, ref_dtype))
        _compare(name, [('eval.output', got, want)], rtol, atol, rows)


def run(device: str, kernels=KERNELS) -> list:
    rows = []
    for kernel in kernels:
        _run_kernel(device, kernel, rows)
    return rows


def _with_kernel(layer, kernel: str):
    layer.kernel = kernel
    return layer


def _run_kernel(device: str, kernel: str, rows: list) -> None:
    """Every check of the layer with ``kernel`` on ``device`` (check names start with the kernel but for 'auto')."""
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    k = '' if kernel == 'auto' else f'{kernel}.'
    for combine in ('posterior', 'mn'):
        for fmt_name, fmt in (('contiguous', torch.contiguous_format), ('channels_last', torch.channels_last)):
            for split in (False, True) if combine == 'posterior' else (False,):
                torch.manual_seed(0)
                base = CompoundBatchNorm2d(CHANNELS, COMPONENTS, combine=combine)
                tag = f"{k}{combine}.{fmt_name}{'.split' if split else ''}"
                # eager device fp32 against float64 CPU (the reference: the CPU's own formulation)
                test = _with_kernel(copy.deepcopy(base).to(device), kernel)
                _run_pair(f'float64.{tag}', (test, test), copy.deepcopy(base).double(), device, 'cpu', torch.float64,
                          fmt, split, 1e-4, 1e-4, 1e-4, rows)
                # compiled device against eager device
                torch._dynamo.reset()
                module = _with_kernel(copy.deepcopy(base).to(device), kernel)
                _run_pair(f'compiled.{tag}', (torch.compile(module, fullgraph=True), module),
                          _with_kernel(copy.deepcopy(base).to(device), kernel), device, device, torch.float32, fmt,
                          split, 1e-4, 1e-4, 1e-5, rows)
    # bf16 map under autocast against the fp32 layer on the same (bf16-representable) values
    torch.manual_seed(0)
    layer = _with_kernel(CompoundBatchNorm2d(CHANNELS, COMPONENTS).to(device), kernel)
    ref = copy.deepcopy(layer)
    x = (torch.randn(8, CHANNELS, 6, 6, device=device) * 2).to(torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    y_ref = ref(x.float())
    rows.append({'check': f'{k}bf16.autocast', 'tensor': 'output dtype', 'max_abs_diff': 0.0, 'rtol': 0, 'atol': 0,
                 'dtype': str(y.dtype).replace('torch.', ''), 'ok': y.dtype == torch.bfloat16
                 and all(getattr(layer, b).dtype == torch.float32 for b in BUFFERS[:3])})
    _compare(f'{k}bf16.autocast', [('output', y.float(), y_ref)], 2e-2, 2e-2, rows)
    _compare(f'{k}bf16.autocast', [(b, getattr(layer, b), getattr(ref, b)) for b in BUFFERS[:3]], 2e-2, 2e-2, rows)


def _native_available() -> bool:
    """Whether the float64 CPU reference ran the native kernel (False: the GEMM formulation, LT_ZOO_NATIVE=0)."""
    from lt_zoo.layers import compound_bn_native
    return compound_bn_native.available()


def write(rows, args, path):
    res = {'command': 'python benchmarks/gpu_exactness.py ' + ' '.join(sys.argv[1:]), 'device': args.device,
           'environment': {'device': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)',
                           'torch': torch.__version__, 'python': platform.python_version(),
                           'native_cpu_kernel': _native_available(),
                           'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')},
           'passed': all(r['ok'] for r in rows), 'rows': rows}
    with open(path + '.json', 'w') as f:
        json.dump(res, f, indent=2)
    checks = {}
    for r in rows:
        c = checks.setdefault(r['check'], {'n': 0, 'failed': 0, 'worst': 0.0, 'tol': (r['rtol'], r['atol'])})
        c['n'] += 1
        c['failed'] += not r['ok']
        c['worst'] = max(c['worst'], r['max_abs_diff'])
    env = res['environment']
    lines = ['# Compound BN on GPU: exactness', '',
             f"Command: `{res['command']}`.  {env['device']}, torch {env['torch']}, {env['date']}.  "
             f"CBN with C = {CHANNELS}, M = {COMPONENTS}, {STEPS} training steps then eval, batch 8 of 6x6 maps.  "
             f"Verdict: **{'all passed' if res['passed'] else 'FAILED'}**.  The float64 reference ran on the CPU "
             f"{'in the native kernel' if env['native_cpu_kernel'] else 'in the GEMM formulation (LT_ZOO_NATIVE=0)'}.",
             '',
             '| check | tensors compared | failed | largest abs diff |', '|---|---|---|---|']
    lines += [f"| {k} | {v['n']} | {v['failed']} | {v['worst']:.2e} |" for k, v in checks.items()]
    with open(path + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help='cpu: a dry run of this script')
    ap.add_argument('--kernels', nargs='+', default=list(KERNELS), choices=['auto', 'gemm', 'pointwise', 'triton'],
                    help="CompoundBatchNorm2d.kernel of the layers checked (on the CPU, 'triton' runs in Triton's "
                         "interpreter)")
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'gpu_exactness'),
                    help='output path without extension, relative to the repository root')
    args = ap.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_exactness.py: error: no CUDA device visible to torch; the CPU suite (tests/) covers the CPU')
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if args.device == 'cpu' and 'triton' in args.kernels:
        os.environ.setdefault('TRITON_INTERPRET', '1')  # read when lt_zoo (and its Triton kernels) is imported
    rows = run(args.device, args.kernels)
    res = write(rows, args, out)
    for r in rows:
        if not r['ok']:
            print(f"FAILED {r['check']} {r['tensor']}: max |diff| {r['max_abs_diff']:.3e} (rtol {r['rtol']}, "
                  f"atol {r['atol']}, dtype {r['dtype']})")
    print(open(out + '.md').read())
    sys.exit(0 if res['passed'] else 1)


if __name__ == '__main__':
    main()
