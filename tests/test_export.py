"""lt_zoo.export loading: round trip, and truncated or corrupt files named with their folder."""
import json

import pytest
import torch

import timm
import lt_zoo  # noqa: F401  (registers the lt_zoo architectures)
from lt_zoo.export import CONFIG_NAME, WEIGHTS_NAME, ExportError, export_model, load_exported


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('resnet20', num_classes=3, in_chans=1).eval()
    folder = tmp_path_factory.mktemp('export') / 'run'
    export_model(model, str(folder), class_names=['a', 'b', 'c'],
                 data_config=dict(input_size=(1, 8, 8), mean=(0.5,), std=(0.25,), crop_pct=1.0))
    return folder, model


def _copy(src, dst):
    dst.mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_round_trip_predicts_the_same(exported):
    folder, model = exported
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_exported(str(folder)).eval()(x), model(x))


@pytest.mark.parametrize('keep', [0.5, 0.999, 10 / 1e9])
def test_truncated_weights_name_the_folder_and_file(exported, tmp_path, keep):
    """Issue: a truncated model.safetensors raised a raw SafetensorError naming neither folder nor file."""
    folder = _copy(exported[0], tmp_path / 'cut')
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[:max(1, int(len(data) * keep))])
    with pytest.raises(ExportError, match=rf"{folder / WEIGHTS_NAME} is not a readable safetensors file.*"
                                          rf"truncated or corrupt"):
        load_exported(str(folder))


def test_truncated_config_names_the_file(exported, tmp_path):
    folder = _copy(exported[0], tmp_path / 'cut')
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[:len(text) // 2])
    with pytest.raises(ExportError, match=rf"{folder / CONFIG_NAME} is not valid JSON"):
        load_exported(str(folder))


def test_config_that_is_not_an_object_is_refused(exported, tmp_path):
    folder = _copy(exported[0], tmp_path / 'list')
    (folder / CONFIG_NAME).write_text(json.dumps(['resnet20']))
    with pytest.raises(ValueError, match="no 'architecture' key"):
        load_exported(str(folder))


def test_weights_from_another_export_are_refused_and_old_exports_still_load(exported, tmp_path):
    """export_model replaces config.json and model.safetensors one after the other; a kill between the two
    renames pairs one export's config with another's weights, which must not load silently."""
    from lt_zoo.export import WEIGHTS_HASH_KEY
    folder, model = exported
    torch.manual_seed(1)
    other = tmp_path / 'other'
    export_model(timm.create_model('resnet20', num_classes=3, in_chans=1), str(other))
    mixed = _copy(folder, tmp_path / 'mixed')
    (mixed / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ExportError, match=rf"{mixed / WEIGHTS_NAME} is not the file .*config.json was written "
                                          rf"with .*interrupted export"):
        load_exported(str(mixed))
    # an export made before the key existed: loads, unchecked
    old = _copy(folder, tmp_path / 'old')
    cfg = json.loads((old / CONFIG_NAME).read_text())
    del cfg[WEIGHTS_HASH_KEY]
    (old / CONFIG_NAME).write_text(json.dumps(cfg))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_exported(str(old)).eval()(x), model(x))
