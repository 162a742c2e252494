"""Compile CompoundBatchNorm2d's Triton kernels for NVIDIA GPUs on a machine without one, and report what
each program needs: registers a thread, spilled bytes, shared memory and the occupancy they allow.

    python benchmarks/triton_resources.py [--arch 80 90] [--components 4 8] [--tiles PxCwW]
                                          [--out benchmarks/results/triton_resources]

Triton compiles ahead of time without a device: Python -> Triton IR -> LLVM -> PTX, then ``ptxas`` (shipped
in Triton's wheel) to a cubin, whose resource usage ``cuobjdump -res-usage`` prints.  So this checks, on
any machine, that every kernel of ``lt_zoo/layers/compound_bn_triton.py`` compiles for the GPU back end (the
CPU suite runs them in Triton's interpreter, which accepts code a GPU compiler may reject) with the
module's tiles and warps, and that none spills to local memory.  Per kernel variant: the map dtype (the
pointers of x, g and the output; statistics float32), M (``--components``, padded to a power of two where
the kernel holds a component axis) and, for the moments and output passes, with and without g (backward /
forward).  Occupancy: resident warps per multiprocessor over its 64, from the register file (65,536 a
multiprocessor, allocated per warp in units of 256) and the 2,048-thread limit, shared memory aside.
``--tiles PxCwW`` compiles every pass at P positions x C channels and W warps instead of the module's
tiles (the variants ``benchmarks/gpu_layer_speed.py --triton_tiles`` times).

Writes ``<out>.json`` and ``<out>.md``; exits 1 if any kernel fails to compile or spills.  Timing needs a
GPU: benchmarks/gpu_layer_speed.py.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

os.environ.pop('TRITON_INTERPRET', None)  # read when the kernels are defined (lt_zoo's import): compile them

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gpu_layer_speed import parse_tiles, triton_tiles  # noqa: E402  (benchmarks/ is on sys.path)
from lt_zoo.layers import compound_bn_triton as cbt  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
_MAP_POINTERS = ('x_ptr', 'g_ptr', 'out_ptr')
_REGISTERS_PER_SM, _THREADS_PER_SM, _WARPS_PER_SM = 65536, 2048, 64
_TL = {'fp32': tl.float32, 'fp64': tl.float64}


def variants(components):
    """(kernel name, map dtype, M, flag, constexprs) of every launch compound_bn_triton makes; the flag is
    HAS_G of the moments and output passes (with g: backward) and OUTPUT of the E-step (eval)."""
    out = []
    for dt in ('fp32', 'bf16', 'fp16', 'fp64'):
        compute = 'fp64' if dt == 'fp64' else 'fp32'
        for m in components:
            bm = max(2, triton.next_power_of_2(m))
            common = dict(COMPUTE=_TL[compute])
            for output in (False, True):  # the training E-step (R stored) and eval (the output)
                out.append(('_estep_kernel', dt, m, output, dict(common, OUTPUT=output, BLOCK_P=cbt._BLOCK_P,
                                                                 BLOCK_C=cbt._BLOCK_C, BLOCK_M=bm, FLOOR=cbt.R_FLOOR)))
            for has_g in (False, True):
                out.append(('_moments_kernel', dt, m, has_g, dict(common, HAS_G=has_g, BLOCK_P=cbt._MOMENT_P,
                                                                  BLOCK_C=cbt._MOMENT_C, BLOCK_M=bm)))
                out.append(('_combine_kernel', dt, m, has_g, dict(common, M=m, HAS_G=has_g, BLOCK_P=cbt._COMBINE_P,
                                                                  BLOCK_C=cbt._COMBINE_C)))
    return out


def signature(fn, dt: str, constexprs: dict) -> dict:
    """Triton's signature of ``fn``: map pointers in the map's dtype, other pointers in the compute dtype."""
    compute = 'fp64' if dt == 'fp64' else 'fp32'
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name.endswith('_ptr'):
            sig[name] = f'*{dt}' if name in _MAP_POINTERS else f'*{compute}'
        else:
            sig[name] = 'i32'
    return sig


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(_BIN, 'cuobjdump'), '-res-usage', f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)', text)
    if m is None:
        raise RuntimeError(f'cuobjdump printed no resource usage: {text[-500:]}')
    return dict(zip(('registers', 'stack_bytes', 'shared_bytes', 'local_bytes'), map(int, m.groups())))


def occupancy(registers: int, warps: int) -> float:
    """Resident warps over the multiprocessor's 64 (registers and thread count; shared memory aside)."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(_REGISTERS_PER_SM // (per_warp * warps), _THREADS_PER_SM // (32 * warps))
    return programs * warps / _WARPS_PER_SM


def run(archs, components) -> list:
    rows = []
    for arch in archs:
        target = GPUTarget('cuda', arch, 32)
        for name, dt, m, has_g, const in variants(components):
            fn = getattr(cbt, name)
            kernel_name = name.strip('_') + (' (eval)' if const.get('OUTPUT') else '')
            row = {'arch': f'sm_{arch}', 'kernel': kernel_name, 'map_dtype': dt, 'components': m,
                   'with_g': None if 'OUTPUT' in const else has_g, 'warps': cbt._WARPS}
            try:
                kernel = triton.compile(ASTSource(fn=fn, signature=signature(fn, dt, const), constexprs=const),
                                        target=target, options={'num_warps': cbt._WARPS})
                row.update(resources(kernel.asm['cubin']))
                row['occupancy'] = occupancy(row['registers'], cbt._WARPS)
                row['ok'] = row['stack_bytes'] == 0 and row['local_bytes'] == 0
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a finding, recorded
                row.update(ok=False, error=f'{type(e).__name__}: {str(e)[:500]}')
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def write(rows, args, path: str) -> dict:
    res = {'command': 'python benchmarks/triton_resources.py ' + ' '.join(sys.argv[1:]),
           'environment': {'triton': triton.__version__, 'torch': torch.__version__,
                           'python': platform.python_version(),
                           'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')},
           'tiles': {'estep_eval': [cbt._BLOCK_P, cbt._BLOCK_C], 'combine': [cbt._COMBINE_P, cbt._COMBINE_C],
                     'moments': [cbt._MOMENT_P, cbt._MOMENT_C], 'warps': cbt._WARPS},
           'passed': all(r['ok'] for r in rows), 'rows': rows}
    with open(path + '.json', 'w') as f:
        json.dump(res, f, indent=2)
    t = res['tiles']
    lines = ['# Triton kernels of Compound BN: compiled for NVIDIA GPUs without one', '',
             f"Command: `{res['command']}`.  Triton {triton.__version__}, {res['environment']['date']}.  Tiles "
             f"(positions x channels): E-step and eval {t['estep_eval'][0]}x{t['estep_eval'][1]}, output "
             f"{t['combine'][0]}x{t['combine'][1]}, moments {t['moments'][0]}x{t['moments'][1]}; {t['warps']} warps.  "
             f"Verdict: **{'every kernel compiles without spilling' if res['passed'] else 'FAILED'}**.  "
             'Occupancy: resident warps of 64 per multiprocessor allowed by registers and threads (not timed).', '',
             '| arch | kernel | map dtype | M | g | registers | spill bytes | shared bytes | occupancy |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        g = '-' if r['with_g'] is None else ('yes' if r['with_g'] else 'no')
        if 'error' in r:
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['map_dtype']} | {r['components']} | {g} | "
                         f"failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['kernel']} | {r['map_dtype']} | {r['components']} | {g} | {r['registers']} | "
                     f"{r['stack_bytes'] + r['local_bytes']} | {r['shared_bytes']} | {100 * r['occupancy']:.0f}% |")
    with open(path + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--arch', nargs='+', type=int, default=[80, 90],
                    help='CUDA compute capabilities x10 (80: A100, 90: H100/H200)')
    ap.add_argument('--components', nargs='+', type=int, default=[4, 8], help='numbers of components M')
    ap.add_argument('--tiles', default=None, metavar='PxCwW', help='compile at this tile instead of the module\'s')
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'triton_resources'),
                    help='output path without extension, relative to the repository root')
    args = ap.parse_args()
    bad = [a for a in args.arch if a < 70] + [m for m in args.components if m < 1]
    if args.tiles is not None and parse_tiles(args.tiles) is None:
        sys.exit(f'triton_resources.py: error: --tiles {args.tiles}: expected PxCwW with P and C powers of two in '
                 f'16..256 and W a power of two in 1..16 (e.g. 64x32w4)')
    if bad:
        sys.exit(f'triton_resources.py: error: --arch {args.arch} / --components {args.components}: expected '
                 f'compute capabilities >= 70 and M >= 1, got {bad}')
    if cbt.triton is None:
        sys.exit('triton_resources.py: error: Triton is not installed')
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with triton_tiles(f'triton@{args.tiles}' if args.tiles else 'triton'):
        res = write(run(args.arch, args.components), args, out)
    print(open(out + '.md').read())
    sys.exit(0 if res['passed'] else 1)


if __name__ == '__main__':
    main()
