"""lt_zoo.hub: building the Hub folder of a run, the model card, pushing (with a fake HfApi), bad input.

The run directories are written here with the project's own pieces, file for file and key for key what
train/train.py writes: config.yaml (DEFAULTS + overrides, yaml.safe_dump), metrics.jsonl, eval.json
(lt_zoo.metrics.evaluate + the run keys, long_tail from lt_zoo.data.make_long_tailed),
per_class_accuracy.png (lt_zoo.plots) and model.safetensors + config.json (lt_zoo.export.export_model).
"""
import ast
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import timm
import lt_zoo  # noqa: F401  (registers the lt_zoo architectures)
from lt_zoo.data import make_long_tailed
from lt_zoo.export import export_model
from lt_zoo.hub import (HUB_FILES, METHOD_PAPERS, PAPERS, MissingTokenError, papers_for, plain_architecture,
                        push_run, validate_repo_id, write_card)
from lt_zoo.hub.__main__ import main as hub_main
from lt_zoo.layers.normalized_bn import NormalizedBatchNorm2d
from lt_zoo.metrics import evaluate
from lt_zoo.models.pretrained_tags import PRETRAINED_TAGS
from lt_zoo.plots import plot_per_class_accuracy
from lt_zoo.training.config import DEFAULTS, METHODS, validate_config

REPO_ID = 'lt-zoo/resnet20_nbn.fmnist_lt'
CLASS_NAMES = ['T-shirt/top', 'Trouser', 'Pullover']
FAKE_TOKEN = 'hf_FAKEtokenDoNotLeak0123456789abcdefXYZ'


def make_run_dir(path: Path, arch: str, *, method: str, model_kwargs=None, size: int = 16) -> torch.nn.Module:
    """A finished stage-1 run of ``arch`` (1 channel, 3 classes) in ``path``; returns the trained model."""
    model_kwargs = dict(model_kwargs or {})
    labels = np.repeat(np.arange(3), 200)
    ds = datasets.Dataset.from_dict({'label': labels.tolist()})
    train, lt = make_long_tailed(ds, 'label', 5.0, n_max=150)  # counts 150, 67, 30: no few-shot class
    counts = lt.to_dict()['counts']
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3, in_chans=1, **model_kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, size, size))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(60, 3, generator=gen), torch.arange(60) % 3
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(method=method, dataset='fashion_mnist', output_dir=str(path), imbalance_factor=5.0, input_size=size,
               in_chans=1, model=arch, model_kwargs=model_kwargs, epochs=2, warmup_epochs=0, progress=False)
    validate_config(cfg)  # the same schema train/train.py resolves and writes
    path.mkdir(parents=True)
    with open(path / 'config.yaml', 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    with open(path / 'metrics.jsonl', 'w') as f:
        f.write(json.dumps({'epoch': 1, 'lr': 0.1, 'train_loss': 1.0}) + '\n')
    final = evaluate(logits, targets, counts)
    final.update(method=method, stage='stage1', model=model.pretrained_cfg['architecture'], dataset='fashion_mnist',
                 class_names=CLASS_NAMES, class_counts=list(counts), long_tail=lt.to_dict(),
                 train_images=len(train), test_images=60, wall_time_s=1.5, world_size=1,
                 command=f'train.py --config x.yaml --output_dir {path}')
    with open(path / 'eval.json', 'w') as f:
        json.dump(final, f, indent=2)
    plot_per_class_accuracy(final['per_class_acc'], list(counts), str(path / 'per_class_accuracy.png'),
                            class_names=CLASS_NAMES)
    export_model(model, str(path), class_names=CLASS_NAMES,
                 data_config=dict(input_size=(1, size, size), mean=(0.3,), std=(0.35,), crop_pct=1.0,
                                  interpolation='bilinear'))
    return model


@pytest.fixture(scope='module')
def nbn_run(tmp_path_factory):
    """A resnet20_nbn run with nbn_scope='all' (every BN is NBN; the option lands in config.json model_args)."""
    path = tmp_path_factory.mktemp('runs') / 'nbn'
    model = make_run_dir(path, 'resnet20_nbn', method='nbn', model_kwargs={'nbn_scope': 'all'})
    return path, model


@pytest.fixture(scope='module')
def dry_run(nbn_run, tmp_path_factory):
    """The dry-run folder of nbn_run and what push_run logged."""
    run, _ = nbn_run
    out = tmp_path_factory.mktemp('export') / 'hub'
    lines = []
    result = push_run(str(run), REPO_ID, dry_run=True, out=str(out), log=lines.append)
    return result, out, '\n'.join(lines)


@pytest.fixture
def run_copy(nbn_run, tmp_path):
    run, _ = nbn_run
    dst = tmp_path / 'run'
    shutil.copytree(run, dst)
    return dst


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token_here'))


class FakeHfApi:
    """Records the calls push_run makes; snapshots the folder at upload time (it is temporary)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(('upload_folder', repo_id, dict(kwargs, files=files)))
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/0123'})()


def _predict(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------- dry-run folder
def test_dry_run_folder_holds_the_run_files(nbn_run, dry_run):
    run, _ = nbn_run
    result, out, log = dry_run
    expected = {'model.safetensors', 'config.json', 'README.md', 'eval.json', 'training_config.yaml',
                'per_class_accuracy.png', 'metrics.jsonl'}
    assert set(os.listdir(out)) == expected == set(result.files) and set(HUB_FILES) == expected
    for published, source in [('model.safetensors', 'model.safetensors'), ('config.json', 'config.json'),
                              ('eval.json', 'eval.json'), ('training_config.yaml', 'config.yaml'),
                              ('per_class_accuracy.png', 'per_class_accuracy.png')]:
        assert (out / published).read_bytes() == (run / source).read_bytes(), published
    assert not result.uploaded and 'dry run: nothing uploaded' in log and REPO_ID in log
    for name in expected:
        assert name in log


def test_dry_run_default_out_is_run_dir_hub_export(run_copy):
    result = push_run(str(run_copy), REPO_ID, dry_run=True, log=lambda s: None)
    assert result.folder == run_copy / 'hub_export' and (run_copy / 'hub_export' / 'README.md').is_file()
    # a second dry run replaces the previous export
    push_run(str(run_copy), REPO_ID, dry_run=True, log=lambda s: None)
    assert set(os.listdir(run_copy / 'hub_export')) == set(result.files)


def test_exported_folder_loads_with_the_run_predictions(nbn_run, dry_run):
    _, model = nbn_run
    _, out, _ = dry_run
    loaded = timm.create_model('local-dir:' + str(out), pretrained=True)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_predict(loaded, x), _predict(model, x))


# ----------------------------------------------------------------------------------------------- card
def test_card_metadata_round_trips_with_eval_json_values(nbn_run, dry_run):
    run, _ = nbn_run
    _, out, _ = dry_run
    ev = json.loads((run / 'eval.json').read_text())
    assert ev['few'] is None and ev['many'] is not None  # the fixture has no few-shot class
    card = ModelCard.load(out / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'apache-2.0'
    assert data.pipeline_tag == 'image-classification' and data.base_model is None
    assert {'long-tailed', 'image-classification', 'nbn'} <= set(data.tags)
    assert data.datasets == ['zalando-datasets/fashion_mnist']
    got = [(r.metric_type, r.metric_value) for r in data.eval_results]
    assert got == [('accuracy', ev['top1']), ('balanced_accuracy', ev['balanced_acc']), ('accuracy', ev['many']),
                   ('accuracy', ev['medium']), ('ece', ev['ece'])]
    assert not any('Few-shot' in r.metric_name for r in data.eval_results)
    r = data.eval_results[0]
    assert (r.task_type, r.dataset_type, r.dataset_split) == ('image-classification', 'zalando-datasets/fashion_mnist',
                                                              'test')
    assert r.dataset_name == 'Fashion-MNIST-LT (IF 5)'
    assert r.dataset_args['indices_hash'] == ev['long_tail']['indices_hash']
    # the metadata block parses as plain YAML too
    front = (out / 'README.md').read_text().split('---')[1]
    assert yaml.safe_load(front)['model-index'][0]['name'] == REPO_ID.split('/')[1]


def test_card_body_shows_run_numbers(nbn_run, dry_run):
    run, _ = nbn_run
    _, out, _ = dry_run
    ev = json.loads((run / 'eval.json').read_text())
    text = (out / 'README.md').read_text()
    for key in ('top1', 'balanced_acc', 'many', 'medium', 'ece'):
        assert f'| {100 * ev[key]:.2f} |' in text, key
    for i, (name, count) in enumerate(zip(CLASS_NAMES, ev['class_counts'])):
        acc = ev['per_class_acc'][i]
        assert f'| {i} | {name} | {count} | {("many", "medium", "medium")[i]} | {100 * acc:.2f} |' in text
    assert ev['class_counts'] == [150, 67, 30]
    assert ev['long_tail']['indices_hash'] in text and ev['command'] in text
    assert 'import lt_zoo' in text and 'plugin discovery' in text and 'hf-hub:' + REPO_ID in text
    assert '`nbn_scope`' not in text and '"nbn_scope": "all"' in text  # model_args line shows the option
    assert '@article{bao2025nbn' in text and '```bibtex' in text
    assert '![Per-class test accuracy' in text


def test_card_command_matches_push_and_prints_tag_entry(nbn_run, dry_run, tmp_path, capsys):
    run, _ = nbn_run
    _, out, _ = dry_run
    target = tmp_path / 'cards' / 'nbn.md'
    assert hub_main(['card', str(run), '--repo-id', REPO_ID, '--out', str(target)]) == 0
    assert target.read_text() == (out / 'README.md').read_text()
    captured = capsys.readouterr()
    printed = captured.out.split('pretrained_tags.py:\n', 1)[1]
    name, entry = next(iter(ast.literal_eval('{' + printed.strip().rstrip(',') + '}').items()))
    pcfg = json.loads((run / 'config.json').read_text())['pretrained_cfg']
    assert name == 'resnet20_nbn.fmnist_lt' and entry['hf_hub_id'] == REPO_ID
    assert entry['mean'] == tuple(pcfg['mean']) and entry['std'] == tuple(pcfg['std'])
    assert entry['input_size'] == (1, 16, 16) and entry['num_classes'] == 3
    assert list(entry['label_names']) == CLASS_NAMES and entry['paper_ids'] == 'arXiv:2501.03122'
    # every key is a timm PretrainedCfg field, so the entry can be pasted into the table as is
    timm.models.PretrainedCfg(**entry)
    # nbn_scope='all' is not the entrypoint default, which a tag cannot express: warned on stderr
    assert "'nbn_scope': 'all'" in captured.err and 'hf-hub:' + REPO_ID in captured.err


def test_card_of_a_stage2_run_cites_both_stages(run_copy, nbn_run, tmp_path):
    stage1, _ = nbn_run
    cfg = yaml.safe_load((run_copy / 'config.yaml').read_text())
    cfg.update(stage='crt', stage1_dir=str(stage1), sampler='class_balanced')  # method stays 'nbn'
    (run_copy / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev.update(stage='crt')
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    text = write_card(str(run_copy), REPO_ID, str(tmp_path / 'c.md'), log=lambda s: None).read_text()
    assert 'Stage-1 recipe' in text and f'`{stage1}`' in text
    assert '@inproceedings{kang2020decoupling' in text and '@article{bao2025nbn' in text
    assert {'nbn', 'crt'} <= set(ModelCard.load(tmp_path / 'c.md').data.tags)


CHECKOUT = Path(lt_zoo.__file__).resolve().parents[1]


def test_card_shows_checkout_paths_relative_to_the_repository(run_copy, nbn_run, tmp_path):
    # a record written before train/train.py made its paths repo-relative: the card must not show the checkout
    outside, _ = nbn_run
    cfg = yaml.safe_load((run_copy / 'config.yaml').read_text())
    cfg.update(stage='crt', stage1_dir=str(CHECKOUT / 'runs' / 'fmnist_lt' / 'ce'))
    (run_copy / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev.update(stage='crt', command=f'train/train.py --config {CHECKOUT}/train/configs/fmnist_lt/nbn.yaml '
                                   f'--output_dir {CHECKOUT}/runs/fmnist_lt/nbn_crt --data_dir {outside}')
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    text = write_card(str(run_copy), REPO_ID, str(tmp_path / 'c.md'), log=lambda s: None).read_text()
    assert str(CHECKOUT) not in text
    assert ('train/train.py --config train/configs/fmnist_lt/nbn.yaml --output_dir runs/fmnist_lt/nbn_crt '
            f'--data_dir {outside}') in text  # a path outside the checkout is left as it is
    assert 'stage-1 run `runs/fmnist_lt/ce`' in text


def test_card_of_a_resumed_run_shows_the_command_that_starts_it(run_copy, tmp_path):
    from lt_zoo.hub.card import starting_command
    assert starting_command('train/train.py --seed 0 --resume latest --lr 0.1') == ('train/train.py --seed 0 --lr 0.1', True)
    assert starting_command("t.py --resume='runs/a b/checkpoints/epoch_0003'") == ('t.py', True)
    assert starting_command('t.py --resume=latest --seed 1') == ('t.py --seed 1', True)
    assert starting_command('t.py --resume_from_x 1') == ('t.py --resume_from_x 1', False)  # another option
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev['command'] = 'train/train.py --config train/configs/fmnist_lt/nbn.yaml --output_dir runs/x --resume latest'
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    text = write_card(str(run_copy), REPO_ID, str(tmp_path / 'c.md'), log=lambda s: None).read_text()
    assert 'train/train.py --config train/configs/fmnist_lt/nbn.yaml --output_dir runs/x\n```' in text
    assert 'continued from its newest checkpoint (`--resume latest`, left out above' in text
    ev['command'] = 'train/train.py --config train/configs/fmnist_lt/nbn.yaml --output_dir runs/x'
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    text = write_card(str(run_copy), REPO_ID, str(tmp_path / 'c.md'), log=lambda s: None).read_text()
    assert 'runs/x\n```' in text and 'newest checkpoint' not in text  # a run that was never stopped


# paths of one machine: an absolute path of a home, temp or work folder as a token of its own
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:home|root|tmp|work|Users|mnt|var|private)/")


def test_committed_cards_and_records_name_no_machine_path():
    files = sorted((CHECKOUT / 'hub_cards').glob('*.md')) + sorted(
        p for p in (CHECKOUT / 'benchmarks' / 'results').rglob('*') if p.is_file())
    assert len(files) > 10  # the committed cards, benchmark tables and run records are there
    hits = [f"{p.relative_to(CHECKOUT)}: {m.group(0)!r}" for p in files
            for m in [_MACHINE_PATH.search(p.read_text(errors='replace'))] if m]
    assert not hits, hits


# ---------------------------------------------------------------------------------------------- push
def test_push_uploads_one_commit_and_never_writes_the_token(run_copy, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    api = FakeHfApi()
    out = run_copy.parent / 'kept'
    result = push_run(str(run_copy), REPO_ID, private=True, out=str(out), api=api)
    assert result.uploaded and [c[0] for c in api.calls] == ['create_repo', 'upload_folder']
    (_, repo, create), (_, repo2, upload) = api.calls
    assert repo == repo2 == REPO_ID
    assert create == dict(token=FAKE_TOKEN, private=True, exist_ok=True, repo_type='model')
    assert upload['token'] == FAKE_TOKEN and set(upload['files']) == set(HUB_FILES)
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    for blob in upload['files'].values():
        assert FAKE_TOKEN.encode() not in blob
    for p in list(out.rglob('*')) + list(run_copy.rglob('*')):
        if p.is_file():
            assert FAKE_TOKEN.encode() not in p.read_bytes(), p


def test_dry_run_with_a_token_set_writes_no_token(run_copy, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    result = push_run(str(run_copy), REPO_ID, dry_run=True)
    assert all(FAKE_TOKEN.encode() not in (result.folder / f).read_bytes() for f in result.files)
    assert FAKE_TOKEN not in capsys.readouterr().out


def test_real_push_without_token_fails_before_building(run_copy, no_token, monkeypatch, capsys):
    import lt_zoo.hub.publish as publish

    def must_not_run(*a, **k):
        raise AssertionError('built or read before the token check')
    monkeypatch.setattr(publish, 'read_run_dir', must_not_run)
    monkeypatch.setattr(publish, 'build_hub_folder', must_not_run)
    out = run_copy.parent / 'never'
    with pytest.raises(MissingTokenError, match='HF_TOKEN'):
        push_run(str(run_copy), REPO_ID, out=str(out), api=FakeHfApi())
    assert hub_main(['push', str(run_copy), '--repo-id', REPO_ID, '--out', str(out)]) == 2
    assert 'no Hugging Face token' in capsys.readouterr().err
    assert not out.exists() and not (run_copy / 'hub_export').exists()


@pytest.mark.parametrize('repo_id', ['resnet32', 'a/b/c', 'lt zoo/x', 'org/', '/name', 'org/na..me', 'org/-x',
                                     'org/x.', ''])
def test_malformed_repo_ids_are_refused(repo_id, run_copy):
    with pytest.raises(ValueError, match='invalid repo id'):
        push_run(str(run_copy), repo_id, dry_run=True)
    assert not (run_copy / 'hub_export').exists()


def test_valid_repo_ids_pass():
    for repo_id in ('lt-zoo/resnet32_cbn.fmnist_lt', 'someone/my-model_2'):
        assert validate_repo_id(repo_id) == repo_id


# ----------------------------------------------------------------------------------------- bad input
def test_missing_files_are_named(run_copy):
    (run_copy / 'eval.json').unlink()
    (run_copy / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError) as info:
        push_run(str(run_copy), REPO_ID, dry_run=True)
    assert "'eval.json'" in str(info.value) and "'model.safetensors'" in str(info.value)
    assert not (run_copy / 'hub_export').exists()


@pytest.mark.parametrize('name', ['pytorch_model.bin', 'model.pth'])
def test_pickle_checkpoint_is_refused(run_copy, name, monkeypatch):
    (run_copy / 'model.safetensors').unlink()
    (run_copy / name).write_bytes(b'\x80\x04not a real pickle')

    def no_unpickling(*a, **k):
        raise AssertionError('torch.load called on a pickle checkpoint')
    monkeypatch.setattr(torch, 'load', no_unpickling)
    with pytest.raises(ValueError, match=f'pickle checkpoint.*{name}.*safetensors only'):
        push_run(str(run_copy), REPO_ID, dry_run=True)
    assert not (run_copy / 'hub_export').exists()


def test_architecture_that_does_not_fit_the_weights_is_refused(run_copy):
    cfg = json.loads((run_copy / 'config.json').read_text())
    cfg['architecture'] = 'resnet20_cbn'
    (run_copy / 'config.json').write_text(json.dumps(cfg))
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev['model'] = 'resnet20_cbn'
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    # the CBN entrypoint refuses the NBN option recorded in model_args
    with pytest.raises(ValueError, match="architecture 'resnet20_cbn'.*does not load.*nbn_scope"):
        push_run(str(run_copy), REPO_ID, dry_run=True)
    # without it, the NBN weights do not fit the CBN network's keys
    del cfg['model_args']['nbn_scope']
    (run_copy / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'resnet20_cbn'.*does not load") as info:
        push_run(str(run_copy), REPO_ID, dry_run=True)
    msg = str(info.value)
    # every NBN layer (scope 'all': stem + 2 per block x 9 blocks = 19) has alpha and lacks CBN's prior
    assert '19 tensors the architecture needs are missing' in msg and 'running_prior' in msg
    assert '19 checkpoint tensors are unknown to it' in msg and 'bn1.alpha' in msg
    assert "bn1.bias (16,) vs (2, 16)" in msg and len(msg) < 2000  # the default M = 2
    assert not (run_copy / 'hub_export').exists()


def test_eval_and_config_from_different_runs_are_refused(run_copy):
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev['model'] = 'resnet32'
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    with pytest.raises(ValueError, match="eval.json model 'resnet32' differs"):
        push_run(str(run_copy), REPO_ID, dry_run=True)


def test_out_dir_with_foreign_files_is_not_replaced(run_copy, tmp_path):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match='notes.txt'):
        push_run(str(run_copy), REPO_ID, dry_run=True, out=str(out))
    assert (out / 'notes.txt').read_text() == 'keep me'



def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_weights_give_one_line_naming_the_file(run_copy, capsys):
    """Issue: push --dry-run on a truncated model.safetensors printed a SafetensorError traceback."""
    _truncate(run_copy / 'model.safetensors')
    assert hub_main(['push', str(run_copy), '--repo-id', REPO_ID, '--dry-run']) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    assert f"{run_copy / 'model.safetensors'} is not a readable safetensors file" in lines[0]
    assert 'Traceback' not in captured.out + captured.err
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(
        ['config.json', 'config.yaml', 'eval.json', 'metrics.jsonl', 'model.safetensors', 'per_class_accuracy.png'])


@pytest.mark.parametrize('name', ['eval.json', 'config.yaml'])
def test_truncated_run_records_are_named(run_copy, name):
    _truncate(run_copy / name, 0.3)
    if name == 'config.yaml':  # cut inside a flow mapping, which YAML cannot parse
        (run_copy / name).write_text((run_copy / name).read_text() + '\nmodel_kwargs: {nbn_scope: al')
    with pytest.raises(ValueError, match=rf"{run_copy / name} is unreadable \(truncated or corrupt\)"):
        push_run(str(run_copy), REPO_ID, dry_run=True)
    assert not (run_copy / 'hub_export').exists()


@pytest.mark.parametrize('exc', [KeyError('no such key'), OSError(28, 'No space left on device'),
                                 AssertionError('line one\nline two')])
def test_cli_prints_any_failure_as_one_line(exc, run_copy, monkeypatch, capsys):
    import lt_zoo.hub.__main__ as cli

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(cli, 'push_run', fail)
    monkeypatch.setattr(cli, 'write_card', fail)
    for argv in (['push', str(run_copy), '--repo-id', REPO_ID, '--dry-run'],
                 ['card', str(run_copy), '--repo-id', REPO_ID, '--out', str(run_copy / 'card.md')]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f'error: {type(exc).__name__}: '), err


@pytest.mark.slow
def test_cli_process_prints_no_traceback(run_copy):
    """The real ``python -m lt_zoo.hub`` process: exit status 2 and one stderr line."""
    _truncate(run_copy / 'model.safetensors', 0.9)
    proc = subprocess.run([sys.executable, '-m', 'lt_zoo.hub', 'push', str(run_copy), '--repo-id', REPO_ID,
                           '--dry-run'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and 'model.safetensors' in proc.stderr, proc.stderr


# -------------------------------------------------------------------------------------------- fold NBN
def test_plain_architecture_names():
    assert plain_architecture('resnet32_nbn') == 'resnet32'
    assert plain_architecture('resnet50_nbn') == 'resnet50'
    assert plain_architecture('resnet50_nbn_gcl') == 'resnet50_gcl'
    for bad in ('resnet32_cbn', 'resnet32', 'resnet50', 'vit_base'):
        with pytest.raises(ValueError, match='NBN architecture'):
            plain_architecture(bad)


def test_fold_nbn_cifar_depth_exports_plain_lt_zoo_resnet(nbn_run, tmp_path):
    run, model = nbn_run
    result = push_run(str(run), REPO_ID, dry_run=True, out=str(tmp_path / 'f'), fold_nbn=True, log=lambda s: None)
    cfg = json.loads((result.folder / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet20' and 'nbn_scope' not in cfg['model_args']
    assert cfg['model_args'] == {'num_classes': 3, 'in_chans': 1, 'global_pool': 'avg'}
    loaded = timm.create_model('local-dir:' + str(result.folder), pretrained=True)
    assert not any(isinstance(m, NormalizedBatchNorm2d) for m in loaded.modules())
    assert any(isinstance(m, NormalizedBatchNorm2d) for m in model.modules())
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(_predict(loaded, x), _predict(model, x), rtol=0, atol=1e-6)
    text = (result.folder / 'README.md').read_text()
    assert 'trained as `resnet20_nbn`' in text and 'import lt_zoo' in text  # resnet20 is still lt_zoo's


def test_fold_nbn_imagenet_depth_loads_in_vanilla_timm(tmp_path):
    run = tmp_path / 'r18'
    model = make_run_dir(run, 'resnet18_nbn', method='nbn', size=32)
    out = tmp_path / 'hub'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'lt_zoo.hub', 'push', str(run), '--repo-id', 'lt-zoo/r18',
                           '--dry-run', '--fold-nbn', '--out', str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet18' and cfg['model_args'] == {'num_classes': 3, 'in_chans': 1,
                                                                      'global_pool': 'avg'}
    assert 'import lt_zoo  #' not in (out / 'README.md').read_text()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    save_file({'x': x, 'y': _predict(model, x)}, str(tmp_path / 'xy.safetensors'))
    script = (
        "import sys, torch, timm\n"
        "from safetensors.torch import load_file\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "assert 'lt_zoo' not in sys.modules and type(m).__module__ == 'timm.models.resnet'\n"
        f"t = load_file('{tmp_path / 'xy.safetensors'}')\n"
        "with torch.no_grad():\n"
        "    d = (m(t['x']) - t['y']).abs().max().item()\n"
        "print(d)\n"
        "assert d <= 1e-5, d\n")
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_fold_nbn_on_a_model_without_nbn_is_refused(tmp_path):
    run = tmp_path / 'plain'
    make_run_dir(run, 'resnet20', method='ce')
    with pytest.raises(ValueError, match="NBN architecture.*got 'resnet20'"):
        push_run(str(run), REPO_ID, dry_run=True, fold_nbn=True)
    assert not (run / 'hub_export').exists()


# ------------------------------------------------------------------------------------------ citations
def test_every_method_label_has_its_paper():
    assert set(METHODS) <= set(METHOD_PAPERS)
    expected_first = {'cbn': '2212.01007', 'nbn': '2501.03122', 'gcl': '2305.11733', 'fsa': '2008.03673',
                      'balanced_softmax': '2007.10740', 'logit_adjust': '2007.07314', 'ldam_drw': '1906.07413',
                      'crt': '1910.09217', 'lws': '1910.09217', 'tau_norm': '1910.09217'}
    for method, arxiv in expected_first.items():
        assert PAPERS[METHOD_PAPERS[method][0]]['arxiv'] == arxiv, method
    venues = {'cbn': 'ACM MM 2022', 'nbn': 'IEEE TIP 2025', 'gcl': 'CVPR 2022', 'fsa': 'ECCV 2020',
              'balanced_softmax': 'NeurIPS 2020', 'logit_adjust': 'ICLR 2021', 'ldam': 'NeurIPS 2019',
              'decoupling': 'ICLR 2020'}
    for key, venue in venues.items():
        assert PAPERS[key]['venue'] == venue
    for key, paper in PAPERS.items():
        bib = paper['bibtex']
        assert bib.startswith('@') and bib.count('{') == bib.count('}') and paper['arxiv'] in bib, key


def test_papers_for_adds_stage_loss_and_norm():
    assert papers_for('gcl', 'crt', 'gcl', 'resnet32_gcl') == ['gcl', 'decoupling']
    assert papers_for('cbn', 'stage1', 'balanced_softmax', 'resnet32_cbn') == ['cbn', 'balanced_softmax']
    assert papers_for('fsa', 'fsa', 'ce', 'resnet32') == ['fsa']
    assert papers_for('ce', 'stage1', 'ce', 'resnet32_nbn') == ['resnet', 'nbn']
    with pytest.raises(ValueError, match="'mystery'"):
        papers_for('mystery')


def test_listed_tag_is_checked_against_the_checkpoint(nbn_run, tmp_path, monkeypatch, capsys):
    run, _ = nbn_run
    pcfg = json.loads((run / 'config.json').read_text())['pretrained_cfg']
    listed = dict(hf_hub_id=REPO_ID, num_classes=3, input_size=(1, 16, 16), mean=tuple(pcfg['mean']),
                  std=tuple(pcfg['std']), label_names=tuple(CLASS_NAMES))
    monkeypatch.setitem(PRETRAINED_TAGS, 'resnet20_nbn.fmnist_lt', listed)
    text = write_card(str(run), REPO_ID, str(tmp_path / 'a.md')).read_text()
    assert "timm.create_model('resnet20_nbn.fmnist_lt', pretrained=True)" in text
    assert 'differs from this checkpoint' not in capsys.readouterr().err
    monkeypatch.setitem(PRETRAINED_TAGS, 'resnet20_nbn.fmnist_lt', dict(listed, mean=(0.5,), num_classes=10))
    write_card(str(run), REPO_ID, str(tmp_path / 'b.md'))
    assert "differs from this checkpoint in ['num_classes', 'mean']" in capsys.readouterr().err


# ------------------------------------------------------------------------------- benchmark across seeds
# One row of a benchmark seed table (benchmarks/fmnist_lt.py) as lt_zoo.hub.card.benchmark_row returns it.
BENCH_ROW = dict(method='cbn', label='+ dual-path learning (DPL) = CBN', seeds=[0, 1, 2],
                 balanced_acc_per_seed=[0.81234, 0.8129, 0.79871], mean=0.80798, std=0.0076, many=0.84567,
                 medium=0.7012, few=None, top1=0.81, ece=0.05, last_fifth_gain=0.01,
                 command='python benchmarks/fmnist_lt.py --seeds 0 1 2',
                 table='benchmarks/results/fmnist_lt.md')
BENCH_SECTION = '''## Benchmark across seeds

This checkpoint is seed 1 of the benchmark row `cbn` ("+ dual-path learning (DPL) = CBN"), which trains the same recipe once per seed (balanced test split):

| across seeds | value |
|---|---|
| seeds | 3 (0, 1, 2) |
| balanced accuracy %, mean ± std over seeds | 80.80 ± 0.76 |
| balanced accuracy % per seed | 81.23, 81.29, 79.87 |
| many-shot accuracy %, mean over seeds | 84.57 |
| medium-shot accuracy %, mean over seeds | 70.12 |

From `benchmarks/results/fmnist_lt.md`, produced by `python benchmarks/fmnist_lt.py --seeds 0 1 2`.

## Usage
'''


@pytest.fixture
def seed1_run(run_copy):
    """run_copy as seed 1 of BENCH_ROW: config.yaml seed 1, eval.json balanced accuracy 0.8129."""
    cfg = yaml.safe_load((run_copy / 'config.yaml').read_text())
    cfg['seed'] = 1
    (run_copy / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    ev = json.loads((run_copy / 'eval.json').read_text())
    ev['balanced_acc'] = 0.8129
    (run_copy / 'eval.json').write_text(json.dumps(ev))
    return run_copy


def _card(run, **kwargs) -> str:
    from lt_zoo.hub.card import render_model_card
    from lt_zoo.hub.run_record import read_run_dir
    return str(render_model_card(read_run_dir(str(run)), REPO_ID, files=('per_class_accuracy.png',), **kwargs))


def test_card_shows_the_benchmark_row_across_seeds(seed1_run):
    text = _card(seed1_run, benchmark=BENCH_ROW)
    assert BENCH_SECTION in text  # mean ± std, every per-seed value, seed count, shot-group means; no few (None)
    assert text.index('## Results') < text.index('![Per-class') < text.index(BENCH_SECTION)
    assert text.count('## Benchmark across seeds') == 1
    without = _card(seed1_run)
    assert 'Benchmark across seeds' not in without and '80.80' not in without
    assert without == text.replace(BENCH_SECTION, '## Usage\n')  # the section is the only difference


def test_card_compares_the_row_with_every_row_of_its_table(seed1_run):
    others = [dict(method='ce', label='CE', seeds=[0, 1, 2], mean=0.85631, std=0.00502),
              {k: BENCH_ROW[k] for k in ('method', 'label', 'seeds', 'mean', 'std')},
              dict(method='nbn', label='NBN | CE', seeds=[0], mean=0.8633, std=None)]
    text = _card(seed1_run, benchmark=dict(BENCH_ROW, table_rows=others))
    section = text[text.index('## Benchmark across seeds'):text.index('## Usage')]
    assert ('| row | method | seeds | balanced accuracy % |\n|---|---|---|---|\n'
            '| `ce` | CE | 3 | 85.63 ± 0.50 |\n'
            '| **`cbn`** | + dual-path learning (DPL) = CBN | 3 | 80.80 ± 0.76 |\n'
            '| `nbn` | NBN \\| CE | 1 | 86.33 |\n\nFrom `benchmarks/results/fmnist_lt.md`') in section
    # without the table's rows (an older caller) the section is the row alone
    assert BENCH_SECTION in _card(seed1_run, benchmark=BENCH_ROW)


def test_benchmark_row_with_one_seed_shows_the_mean_only(seed1_run):
    row = dict(BENCH_ROW, seeds=[1], balanced_acc_per_seed=[0.8129], mean=0.8129, std=None, many=None, medium=None)
    text = _card(seed1_run, benchmark=row)
    section = text[text.index('## Benchmark across seeds'):text.index('## Usage')]
    assert '| seeds | 1 (1) |\n| balanced accuracy % | 81.29 |\n| balanced accuracy % per seed | 81.29 |\n\n' in section
    assert '±' not in section and 'shot' not in section


def test_benchmark_row_of_another_run_is_refused(seed1_run):
    with pytest.raises(ValueError, match=r"seed 1, which is not one of benchmark row 'cbn'"):
        _card(seed1_run, benchmark=dict(BENCH_ROW, seeds=[0, 2, 3]))
    with pytest.raises(ValueError, match=r"records 0\.8 for seed 1: the table was made from another run"):
        _card(seed1_run, benchmark=dict(BENCH_ROW, balanced_acc_per_seed=[0.81234, 0.8, 0.79871]))
    with pytest.raises(ValueError, match=r"lacks \['table'\]"):
        _card(seed1_run, benchmark={k: v for k, v in BENCH_ROW.items() if k != 'table'})


def _write_table(folder: Path) -> Path:
    row = {k: v for k, v in BENCH_ROW.items() if k not in ('table', 'command')}
    table = {'meta': {'protocol': 'train/configs/fmnist_lt/_base.yaml', 'command': BENCH_ROW['command']},
             'results': [dict(row, command='python train/train.py --config train/configs/fmnist_lt/cbn.yaml --seed K'),
                         dict(row, method='ldam_drw', seeds=[], balanced_acc_per_seed=[], mean=None, std=None)]}
    path = folder / 'fmnist_lt.json'
    path.write_text(json.dumps(table))
    return path


def test_card_command_takes_a_benchmark_table(seed1_run, tmp_path, capsys):
    from lt_zoo.hub import benchmark_row
    table = _write_table(tmp_path)
    listed = [{k: BENCH_ROW[k] for k in ('method', 'label', 'seeds', 'mean', 'std')}]  # ldam_drw: no seed yet
    assert benchmark_row(str(table), 'cbn') == dict(BENCH_ROW, table=str(table), table_rows=listed)  # JSON path
    (tmp_path / 'fmnist_lt.md').write_text('| id | ... |\n')
    assert benchmark_row(str(table), 'cbn')['table'] == str(tmp_path / 'fmnist_lt.md')  # the readable table
    assert benchmark_row(str(table), 'ldam_drw') is None and benchmark_row(str(table), 'gcl') is None
    out = tmp_path / 'card.md'
    argv = ['card', str(seed1_run), '--repo-id', REPO_ID, '--out', str(out), '--benchmark', str(table)]
    assert hub_main(argv + ['--benchmark-row', 'cbn']) == 0
    text = out.read_text()
    assert '| **`cbn`** | + dual-path learning (DPL) = CBN | 3 | 80.80 ± 0.76 |\n\nFrom `' in text
    assert '`ldam_drw`' not in text
    capsys.readouterr()
    assert hub_main(argv + ['--benchmark-row', 'ldam_drw']) == 2
    assert "has no finished seed of row 'ldam_drw'" in capsys.readouterr().err
    assert hub_main(argv) == 2  # the test repo is no SOURCE_ROWS tag: the row must be named
    assert '--benchmark needs --benchmark-row' in capsys.readouterr().err


def _render_all():
    spec = importlib.util.spec_from_file_location('render_all', CHECKOUT / 'hub_cards' / 'render_all.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_all_passes_each_tag_its_benchmark_row():
    from lt_zoo.models.pretrained_tags import BENCHMARK_TABLE, SOURCE_ROWS, SOURCE_RUNS
    spec = importlib.util.spec_from_file_location('fmnist_lt_benchmark', CHECKOUT / 'benchmarks' / 'fmnist_lt.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(SOURCE_ROWS) == set(SOURCE_RUNS) == set(PRETRAINED_TAGS)
    assert set(SOURCE_ROWS.values()) <= set(bench.TABLES['fmnist_lt']) <= set(bench.RUNS)
    table = json.loads((CHECKOUT / BENCHMARK_TABLE).read_text())
    by_id = {r['method']: r for r in table['results']}
    rows = _render_all().benchmark_rows()
    assert set(rows) == set(SOURCE_RUNS)
    for tag, row in rows.items():
        want = by_id.get(SOURCE_ROWS[tag])
        if want is None or not want['seeds']:
            assert row is None, tag
        else:
            listed = [{k: r[k] for k in ('method', 'label', 'seeds', 'mean', 'std')} for r in table['results']
                      if r['seeds']]
            assert row == dict(want, table='benchmarks/results/fmnist_lt.md', command=table['meta']['command'],
                               table_rows=listed), tag


def test_refreshing_the_benchmark_section_rewrites_that_section_only(seed1_run, tmp_path):
    from lt_zoo.hub.card import refresh_benchmark_section
    whole, without = _card(seed1_run, benchmark=BENCH_ROW), _card(seed1_run)
    card = tmp_path / 'card.md'
    card.write_text(without)  # rendered while the row had no finished seed: the section is inserted
    assert refresh_benchmark_section(str(card), BENCH_ROW, 1, 0.8129, 'record') is True
    assert card.read_text() == whole
    assert refresh_benchmark_section(str(card), BENCH_ROW, 1, 0.8129, 'record') is False  # unchanged
    four = dict(BENCH_ROW, seeds=[0, 1, 2, 3], balanced_acc_per_seed=[0.81234, 0.8129, 0.79871, 0.8], mean=0.8061,
                std=0.0069)
    assert refresh_benchmark_section(str(card), four, 1, 0.8129, 'record') is True
    text = card.read_text()
    assert '| seeds | 4 (0, 1, 2, 3) |\n| balanced accuracy %, mean ± std over seeds | 80.61 ± 0.69 |' in text
    assert text.replace(text[text.index('## Benchmark across seeds'):text.index('## Usage')], '') == \
        whole.replace(BENCH_SECTION, '## Usage\n')  # nothing else moved
    with pytest.raises(ValueError, match=r"run 'record' has balanced accuracy 0\.7, but benchmark row 'cbn'"):
        refresh_benchmark_section(str(card), four, 1, 0.7, 'record')
    assert card.read_text() == text  # a refusal writes nothing
    card.write_text('# no sections\n')
    with pytest.raises(ValueError, match="render it whole"):
        refresh_benchmark_section(str(card), four, 1, 0.8129, 'record')
