"""What machine a benchmark ran on, and where its results go (shared by the benchmark scripts)."""
import json
import os
import platform
from typing import Callable

__all__ = ['cpu_model', 'write_results']

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_results(res: dict, out: str, write_markdown: Callable[[dict, str], None]) -> str:
    """``out``.json and ``out``.md (``out`` relative to the repository unless absolute); -> the full stem."""
    out = out if os.path.isabs(out) else os.path.join(ROOT, out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump(res, f, indent=1)
    write_markdown(res, out + '.md')
    print(f'wrote {out}.json and .md')
    return out


def cpu_model() -> str:
    """The CPU's model name and widest vector extension, e.g. 'AMD EPYC (AVX2)': the same model name has
    come with and without AVX-512 here, and the native CBN kernel's tile is one vector register wide."""
    name, flags = '', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and not name:
                    name = line.split(':', 1)[1].strip()
                elif line.startswith('flags') and not flags:
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or 'unknown'
    isa = next((label for flag, label in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX'))
                if flag in flags), None)
    return f'{name} ({isa})' if isa else name
