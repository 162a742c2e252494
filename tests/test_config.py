"""lt_zoo.training.config: defaults, ``base:`` inheritance, command-line overrides, validation, and
every shipped config under train/configs/ (loads, validates, and is consistent with its siblings)."""
import copy
from pathlib import Path

import pytest
import yaml

from lt_zoo.losses import list_losses
from lt_zoo.samplers import list_samplers
from lt_zoo.training.config import DEFAULTS, METHODS, SCHEMA, STAGES, describe_keys, load_config, read_config_file

CONFIGS = Path(__file__).resolve().parents[1] / 'train' / 'configs'
ALL_FILES = sorted(CONFIGS.rglob('*.yaml'))
METHOD_NAMES = sorted(p.stem for p in (CONFIGS / 'methods').glob('*.yaml'))
# places_lt/ holds fine-tuning recipes from ImageNet weights (docs/pretrained.md), not the method grid
RECIPES = ('places_lt',)
DATASETS = sorted(d.name for d in CONFIGS.iterdir() if d.is_dir() and d.name not in ('methods',) + RECIPES)
DATASET_FILES = [p for p in ALL_FILES if p.parent.name in DATASETS and not p.name.startswith('_')]


def _ids(paths):
    return [str(p.relative_to(CONFIGS)) for p in paths]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _load(path: Path, *extra):
    """A shipped config as train.py resolves it; a stage-2 method file alone gets a stand-in stage1_dir."""
    raw = read_config_file(str(path))
    if raw.get('stage', 'stage1') != 'stage1' and not raw.get('stage1_dir'):
        extra = ('--stage1_dir', 'runs/stage1', *extra)
    return load_config(['--config', str(path), *extra])


# ---------------------------------------------------------------------------------------- defaults
def test_defaults_are_filled_in_and_not_shared():
    cfg = load_config(['--model', 'resnet32'])
    assert cfg == {**DEFAULTS, 'model': 'resnet32'} and list(cfg) == list(SCHEMA)
    assert cfg['stage'] == 'stage1' and cfg['epochs'] == 200 and cfg['lr'] == 0.1  # LDAM/GCL CIFAR recipe
    cfg['model_kwargs']['num_components'] = 2
    cfg['lr_steps'].append(190)
    assert DEFAULTS['model_kwargs'] == {} and DEFAULTS['lr_steps'] == [160, 180]
    assert load_config(['--model', 'resnet32'])['model_kwargs'] == {}


def test_model_has_no_default_so_stage2_takes_the_stage1_architecture():
    assert DEFAULTS['model'] is None
    assert load_config(['--stage', 'crt', '--stage1_dir', 'runs/x'])['model'] is None


def test_stop_after_epoch_needs_checkpoints():
    with pytest.raises(ValueError, match=r"stop_after_epoch needs save_checkpoints"):
        load_config(['--model', 'resnet32', '--stop_after_epoch', '1', '--save_checkpoints', 'false'])


def test_file_keys_override_defaults_and_command_line_overrides_file(tmp_path):
    f = _write(tmp_path / 'run.yaml', {'epochs': 7, 'model': 'resnet32_cbn', 'loss_kwargs': {'tau': 2.0}})
    cfg = load_config(['--config', str(f)])
    assert (cfg['epochs'], cfg['model'], cfg['loss_kwargs']) == (7, 'resnet32_cbn', {'tau': 2.0})
    assert {k: v for k, v in cfg.items() if k not in ('epochs', 'model', 'loss_kwargs')} == \
        {k: v for k, v in DEFAULTS.items() if k not in ('epochs', 'model', 'loss_kwargs')}
    assert load_config(['--config', str(f), '--epochs', '6'])['epochs'] == 6
    assert load_config(['--config', str(f), '--loss_kwargs', '{}'])['loss_kwargs'] == {}  # replaced, not merged


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(['--config', str(_write(tmp_path / 'empty.yaml', ''))]) == DEFAULTS


# ---------------------------------------------------------------------------------- base inheritance
def test_base_order_is_bases_in_turn_then_own_keys(tmp_path):
    _write(tmp_path / 'c.yaml', {'seed': 1, 'pad': 0, 'lr': 0.9})
    _write(tmp_path / 'sub' / 'a.yaml', {'base': '../c.yaml', 'lr': 0.5, 'epochs': 5, 'batch_size': 8})
    _write(tmp_path / 'b.yaml', {'lr': 0.25, 'seed': 3})
    top = _write(tmp_path / 'top.yaml', {'base': ['sub/a.yaml', 'b.yaml'], 'epochs': 9})
    merged = read_config_file(str(top))
    # c < a (a's base first, then a), then b, then top; relative paths resolve against each file's folder
    assert merged == {'seed': 3, 'pad': 0, 'lr': 0.25, 'epochs': 9, 'batch_size': 8}
    cfg = load_config(['--config', str(top)])
    assert {k: cfg[k] for k in merged} == merged and 'base' not in cfg
    flipped = _write(tmp_path / 'flipped.yaml', {'base': ['b.yaml', 'sub/a.yaml']})
    assert read_config_file(str(flipped))['lr'] == 0.5 and read_config_file(str(flipped))['seed'] == 1


def test_a_file_may_name_the_same_base_twice_without_a_loop(tmp_path):
    _write(tmp_path / 'common.yaml', {'pad': 1})
    _write(tmp_path / 'x.yaml', {'base': 'common.yaml', 'seed': 4})
    top = _write(tmp_path / 'top.yaml', {'base': ['common.yaml', 'x.yaml']})  # diamond, not a loop
    assert read_config_file(str(top)) == {'pad': 1, 'seed': 4}


@pytest.mark.parametrize('layout', ['self', 'pair', 'three'])
def test_base_loops_are_detected(tmp_path, layout):
    names = {'self': ['a'], 'pair': ['a', 'b'], 'three': ['a', 'b', 'c']}[layout]
    for here, nxt in zip(names, names[1:] + names[:1]):
        _write(tmp_path / f'{here}.yaml', {'base': f'{nxt}.yaml', 'seed': 1})
    with pytest.raises(ValueError, match=r'include each other in a loop.*a\.yaml'):
        load_config(['--config', str(tmp_path / 'a.yaml')])


def test_missing_base_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'nowhere\.yaml.*does not exist'):
        read_config_file(str(_write(tmp_path / 'a.yaml', {'base': 'nowhere.yaml'})))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_config(['--config', str(tmp_path / 'absent.yaml')])
    with pytest.raises(ValueError, match=r'must hold a mapping of keys, got list'):
        load_config(['--config', str(_write(tmp_path / 'list.yaml', '- 1\n- 2\n'))])


def test_unknown_key_in_a_file_names_file_key_suggestion_and_valid_keys(tmp_path):
    base = _write(tmp_path / 'base.yaml', {'learning_rate': 0.1})
    top = _write(tmp_path / 'top.yaml', {'base': 'base.yaml', 'epochs': 3})
    with pytest.raises(ValueError) as err:
        load_config(['--config', str(top)])
    msg = str(err.value)
    assert "unknown config key 'learning_rate'" in msg and str(base) in msg
    assert 'valid keys:' in msg and all(repr(k) in msg for k in SCHEMA)
    with pytest.raises(ValueError, match=r"unknown config key 'weigth_decay'.*did you mean \['weight_decay'"):
        load_config(['--config', str(_write(tmp_path / 'typo.yaml', {'weigth_decay': 0.1}))])


# ------------------------------------------------------------------------------ command-line overrides
@pytest.mark.parametrize('argv,key,value', [
    (['--lr', '0.01'], 'lr', 0.01),
    (['--lr', '1e-3'], 'lr', 0.001),  # YAML 1.1 alone would keep '1e-3' a string
    (['--weight_decay', '5E-4'], 'weight_decay', 0.0005),
    (['--epochs', '7'], 'epochs', 7),
    (['--epochs=8'], 'epochs', 8),
    (['--batch-size', '16'], 'batch_size', 16),
    (['--lr_steps', '[5, 8]'], 'lr_steps', [5, 8]),
    (['--loss_kwargs', '{tau: 2.0, base: ce}'], 'loss_kwargs', {'tau': 2.0, 'base': 'ce'}),
    (['--model_kwargs={num_components: 2}'], 'model_kwargs', {'num_components': 2}),
    (['--hflip', 'false'], 'hflip', False),
    (['--hflip'], 'hflip', True),
    (['--overwrite'], 'overwrite', True),
    (['--resume'], 'resume', 'latest'),
    (['--resume', 'runs/x/checkpoints/epoch_0002'], 'resume', 'runs/x/checkpoints/epoch_0002'),
    (['--grad_clip', 'null'], 'grad_clip', None),
    (['--grad_clip', '1.5'], 'grad_clip', 1.5),
    (['--model', 'resnet32_cbn'], 'model', 'resnet32_cbn'),
    (['--dual_cls_views', '[weak, strong]'], 'dual_cls_views', ['weak', 'strong']),
])
def test_overrides_are_parsed_as_yaml(argv, key, value):
    cfg = load_config(argv)
    assert cfg[key] == value and type(cfg[key]) is type(value)


def test_bare_flags_followed_by_other_keys():
    cfg = load_config(['--overwrite', '--epochs', '6', '--progress', '--deterministic'])
    assert cfg['overwrite'] is True and cfg['epochs'] == 6 and cfg['progress'] is True and cfg['deterministic'] is True
    cfg = load_config(['--resume', '--lr', '0.2'])
    assert cfg['resume'] == 'latest' and cfg['lr'] == 0.2


def test_override_errors():
    with pytest.raises(ValueError, match=r"expected --key value, got 'stray'"):
        load_config(['--epochs', '2', 'stray'])
    with pytest.raises(ValueError, match=r"unknown config key 'lerning_rate' in command line.*valid keys"):
        load_config(['--lerning_rate', '0.1'])
    with pytest.raises(ValueError, match=r"did you mean \['batch_size'"):
        load_config(['--batchsize', '8'])


@pytest.mark.parametrize('argv,match', [
    (['--epochs', '-1'], r'epochs must be an integer >= 0, got -1'),
    (['--epochs', '2.5'], r'epochs must be an integer >= 0, got 2.5'),
    (['--epochs', 'true'], r'epochs must be an integer >= 0, got True'),
    (['--batch_size', '0'], r'batch_size must be an integer >= 1, got 0'),
    (['--imbalance_factor', '0.5'], r'imbalance_factor must be a finite number in \[1, inf\), got 0.5'),
    (['--lr', '-0.1'], r'lr must be a finite number in \(0, inf\), got -0.1'),
    (['--lr', 'fast'], r"lr must be a finite number in \(0, inf\), got 'fast'"),
    (['--mixed_precision', 'fp8'], r"invalid mixed_precision 'fp8'; expected one of \('no', 'bf16', 'fp16'\)"),
    (['--method', 'magic'], r"invalid method 'magic'; expected one of"),
    (['--stage', 'stage3'], r"invalid stage 'stage3'; expected one of \('stage1', 'crt'"),
    (['--scheduler', 'linear'], r"invalid scheduler 'linear'"),
    (['--in_chans', '2'], r'in_chans must be 1, 3 or null, got 2'),
    (['--dual_cls_views', '[medium]'], r"dual_cls_views must be a list drawn from \('weak', 'strong'\)"),
    (['--dual_cls_paths', 'split'], r"dual_cls_paths must be a list drawn from"),
    (['--model_kwargs', '[1]'], r'model_kwargs must be a mapping, got \[1\]'),
    (['--stage', 'crt'], r"stage 'crt' needs stage1_dir"),
    (['--resume', '--overwrite'], r'resume and overwrite exclude each other'),
    # every numeric key is range-checked, not only for its type
    (['--epochs', '0'], r"stage 'stage1' trains, so epochs must be >= 1, got 0"),
    (['--lr', '0'], r'lr must be a finite number in \(0, inf\), got 0'),
    (['--momentum', '1.0'], r'momentum must be a finite number in \[0, 1\), got 1.0'),
    (['--weight_decay', '-1e-4'], r'weight_decay must be a finite number in \[0, inf\), got -0.0001'),
    (['--warmup_epochs', '-1'], r'warmup_epochs must be an integer >= 0, got -1'),
    (['--epochs', '5', '--warmup_epochs', '5'], r'warmup_epochs \(5\) must be < epochs \(5\)'),
    (['--input_size', '0'], r'input_size must be an integer >= 1, got 0'),
    (['--eval_every', '0'], r'eval_every must be an integer >= 1, got 0'),
    (['--keep_checkpoints', '0'], r'keep_checkpoints must be an integer >= 1, got 0'),
    (['--consistency_weight', '-0.1'], r'consistency_weight must be a finite number in \[0, inf\), got -0.1'),
    (['--fsa_head_ratio', '1.0'], r'fsa_head_ratio must be a finite number in \(0, 1\), got 1.0'),
    (['--fsa_tau_s', '1.5'], r'fsa_tau_s must be a finite number in \[0, 1\], got 1.5'),
    (['--fsa_lr', '0'], r'fsa_lr must be a finite number in \(0, inf\), got 0'),
    (['--fsa_iterations', '0'], r'fsa_iterations must be an integer >= 1, got 0'),
    (['--grad_clip', '0'], r'grad_clip must be a number > 0 or null, got 0'),
    (['--lr', '.nan'], r'lr must be a finite number in \(0, inf\), got nan'),
    (['--stop_after_epoch', '0'], r'stop_after_epoch must be an integer >= 1 or null, got 0'),
    (['--lr_steps', '[0, 5]'], r'lr_steps must be a list of epochs >= 1, got \[0, 5\]'),
    (['--hflip', 'maybe'], r"hflip must be true or false, got 'maybe'"),
    (['--few_threshold', '200'], r'few_threshold \(200\) must not exceed many_threshold \(100\)'),
    # combinations that are not implemented are refused, naming what is supported
    (['--dual_path', 'true', '--mixup_alpha', '1.0'], r'mixup_alpha=1.0 with dual_path is not implemented.*'
                                                      r'use mixup_alpha: 0 or dual_path: false'),
    (['--stage', 'crt', '--stage1_dir', 'runs/x', '--dual_path', 'true'], r"dual_path is a stage-1 method; stage 'crt'"),
    (['--stage', 'tau_norm', '--stage1_dir', 'runs/x', '--sampler', 'class_balanced'],
     r"stage 'tau_norm' does not use \['sampler'\].*supported: the defaults \{'sampler': 'instance'\}"),
    (['--stage', 'fsa', '--stage1_dir', 'runs/x', '--mixup_alpha', '1.0', '--loss', 'focal'],
     r"stage 'fsa' does not use \['loss', 'mixup_alpha'\]"),
    (['--stage', 'fsa', '--stage1_dir', 'runs/x', '--epochs', '10', '--fsa_iterations', '5'],
     r'fsa_iterations \(5\) are spread over the epochs, so they must be >= epochs \(10\)'),
    (['--dual_path', 'true', '--train_aug', 'strong'], r"train_aug='strong' with dual_path is not implemented"),
    (['--dual_stat_updates', 'once'], r"dual_stat_updates='once' needs dual_path: true"),
    (['--dual_path', 'true', '--dual_stat_updates', 'twice'], r"invalid dual_stat_updates 'twice'"),
    (['--data_cache', 'tensors', '--train_crop', 'random_resized'],
     r"data_cache: tensors implements train_crop: pad only"),
    (['--data_cache', 'tensors', '--num_workers', '2'], r'data_cache: tensors needs no DataLoader workers'),
    (['--data_cache', 'arrow'], r"invalid data_cache 'arrow'; expected one of \('pil', 'tensors'\)"),
    (['--train_aug', 'medium'], r"invalid train_aug 'medium'"),
    (['--channels_last', 'yes please'], r"channels_last must be true or false"),
    # an option that cannot train is refused, with the reason
    (['--model', 'resnet20_cbn', '--model_kwargs', '{train_stats: running}'],
     r'train_stats: running does not train from scratch.*NaN'),
])
def test_bad_values_are_refused_with_the_value_named(argv, match):
    with pytest.raises(ValueError, match=match):
        load_config(argv)


def test_describe_keys_and_help_list_every_key(capsys):
    table = describe_keys()
    assert all(f'| `{k}` |' in table for k in SCHEMA)
    with pytest.raises(SystemExit) as exit_info:
        load_config(['--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f'  --{k} (default {DEFAULTS[k]!r}): ' in out for k in SCHEMA)


# ----------------------------------------------------------------------------- shipped config files
def test_config_tree_is_complete():
    assert len(METHOD_NAMES) == 15 and set(DATASETS) >= {'digits', 'fmnist_lt', 'cifar10_lt', 'cifar100_lt',
                                                          'imagenet_lt'}
    for dataset in DATASETS:  # every method is available for every dataset
        stems = sorted(p.stem for p in (CONFIGS / dataset).glob('*.yaml') if not p.name.startswith('_'))
        assert stems == METHOD_NAMES, dataset
        assert (CONFIGS / dataset / '_base.yaml').is_file()


@pytest.mark.parametrize('path', ALL_FILES, ids=_ids(ALL_FILES))
def test_every_config_file_loads_validates_and_uses_known_keys(path):
    raw = yaml.safe_load(path.read_text()) or {}
    assert isinstance(raw, dict)
    unknown = set(raw) - set(SCHEMA) - {'base'}
    assert not unknown, f'{path}: unknown keys {unknown}'
    cfg = _load(path)
    assert set(cfg) == set(SCHEMA)
    for key, value in raw.items():  # a file's own keys win over its bases and the defaults
        if key not in ('base',):
            assert cfg[key] == value, key
    assert cfg['loss'] in list_losses() and cfg['sampler'] in list_samplers()
    assert cfg['method'] in METHODS and cfg['stage'] in STAGES


@pytest.mark.parametrize('path', DATASET_FILES, ids=_ids(DATASET_FILES))
def test_dataset_config_combines_its_base_and_method(path):
    raw = yaml.safe_load(path.read_text())
    assert raw['base'] == ['_base.yaml', f'../methods/{path.stem}.yaml']
    cfg = load_config(['--config', str(path)])
    method = read_config_file(str(CONFIGS / 'methods' / f'{path.stem}.yaml'))
    base = read_config_file(str(path.parent / '_base.yaml'))
    for key, value in {**base, **method}.items():  # method keys override the dataset recipe unless re-set here
        if key not in raw:
            assert cfg[key] == value, key
    assert cfg['output_dir'] == f'runs/{path.parent.name}/{path.stem}'


@pytest.mark.parametrize('dataset', DATASETS)
def test_dataset_configs_fit_together(dataset):
    """What train.py would refuse at run time, checked statically for every shipped recipe."""
    cfgs = {p.stem: load_config(['--config', str(p)]) for p in DATASET_FILES if p.parent.name == dataset}
    by_output = {c['output_dir']: name for name, c in cfgs.items()}
    assert len(by_output) == len(cfgs)  # no two recipes write the same run directory
    for name, c in cfgs.items():
        cosine_loss = c['loss'] in ('gcl', 'ldam')
        if c['stage'] == 'stage1':
            assert c['stage1_dir'] is None, name
            model = c['model']
        else:  # a stage-2 recipe starts from a stage-1 recipe of the same dataset
            parent = by_output.get(c['stage1_dir'])
            assert parent is not None and cfgs[parent]['stage'] == 'stage1', (name, c['stage1_dir'])
            model = cfgs[parent]['model']
        head_is_cosine = model.endswith('_gcl')
        assert cosine_loss <= head_is_cosine, (name, model)  # GCL/LDAM need a cosine head
        if c['stage'] in ('lws', 'tau_norm'):
            assert not head_is_cosine, name
        if c['dual_path']:
            assert 'cbn' in model, name
        if c['loss'] == 'ldam':  # DRW from 80% of the epochs (LDAM-DRW: 160 of 200)
            assert c['loss_kwargs']['drw_epoch'] == int(0.8 * c['epochs']), name
        if c['stage'] == 'tau_norm':
            assert c['epochs'] == 0


def test_running_train_stats_is_allowed_for_fine_tuning_pretrained_weights():
    cfg = load_config(['--model', 'resnet50_cbn', '--model_kwargs', '{train_stats: running, pretrained: true}'])
    assert cfg['model_kwargs'] == {'train_stats': 'running', 'pretrained': True}


@pytest.mark.parametrize('argv', [['--mixed_precision', 'no'], ['--mixed_precision=no']])
def test_mixed_precision_no_on_the_command_line_is_the_string_not_yaml_false(argv):
    # YAML 1.1 reads a bare `no` as false; the choice keys keep the text
    assert load_config(argv)['mixed_precision'] == 'no'


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('mixed_precision: no\n')
    assert load_config(['--config', str(path)])['mixed_precision'] == 'no'
