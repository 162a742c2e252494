"""lt_zoo.data.cache: build once, load back memory-mapped, and rebuild a damaged cache with a warning."""
import datasets
import pytest

from lt_zoo.data.cache import cached_dataset_dict, files_digest


def _build(calls):
    def build():
        calls.append(1)
        return datasets.DatasetDict({'train': datasets.Dataset.from_dict({'label': list(range(50)), 'x': [i * 0.5 for i in range(50)]})})
    return build


def test_cache_builds_once_and_loads_back_the_same_rows(tmp_path):
    calls = []
    first = cached_dataset_dict('toy', 'k1', _build(calls), cache_dir=tmp_path)
    again = cached_dataset_dict('toy', 'k1', _build(calls), cache_dir=tmp_path)
    assert len(calls) == 1
    assert again['train']['label'] == first['train']['label'] == list(range(50))
    assert again['train']['x'][7] == 3.5


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_damaged_cache_is_named_removed_and_rebuilt(tmp_path, damage):
    calls = []
    cached_dataset_dict('toy', 'k2', _build(calls), cache_dir=tmp_path)
    arrow = sorted((tmp_path / 'toy-k2' / 'train').glob('*.arrow'))
    assert arrow, 'the cache holds Arrow files'
    data = arrow[0].read_bytes()
    arrow[0].write_bytes(data[:len(data) // 3] if damage == 'truncate' else b'not an arrow file' * 10)
    with pytest.warns(UserWarning, match=r"the cached toy at .*toy-k2 is unreadable .*; rebuilding it"):
        rebuilt = cached_dataset_dict('toy', 'k2', _build(calls), cache_dir=tmp_path)
    assert len(calls) == 2
    assert rebuilt['train']['label'] == list(range(50))
    assert cached_dataset_dict('toy', 'k2', _build(calls), cache_dir=tmp_path)['train']['x'][49] == 24.5
    assert len(calls) == 2  # the rebuilt cache is read back without a third build


def test_files_digest_depends_on_bytes_order_and_extra(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.write_bytes(b'one')
    b.write_bytes(b'two')
    d = files_digest([a, b])
    assert len(d) == 16 and d == files_digest([a, b])
    assert d != files_digest([b, a]) and d != files_digest([a, b], extra='x')
    b.write_bytes(b'tw0')
    assert d != files_digest([a, b])
