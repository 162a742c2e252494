"""A real Hugging Face hub cache entry for offline tests: models--ORG--NAME/{refs/main, snapshots/<commit>/}.

huggingface_hub resolves `hf_hub_download(repo_id, file)` under HF_HUB_OFFLINE=1 from exactly this layout,
so the tests exercise the real loading code with no network and no mock.
"""
import hashlib
from pathlib import Path
from typing import Callable, Dict


def install_snapshot(cache: Path, repo_id: str, files: Dict[str, Callable[[Path], None]]) -> Path:
    """Write each ``files[name](path)`` into a new snapshot of ``repo_id`` under ``cache``; returns the snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)  # huggingface_hub reads it unstripped: no newline
    return snapshot
