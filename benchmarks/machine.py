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
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else 'unknown'."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'
