import dataclasses

import pytest

from shpeft.methods import METHODS, get_method, method_info
from tests.methods.common import check_method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_passes_the_generic_checks(name, tmp_path):
    """Every entry of the registry, at its default settings (the per-method test files add hand
    counts of what each trains)."""
    check_method(name, expected_backbone=None, tmp_path=tmp_path, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_entry_and_implementation_agree(name):
    info, cls = method_info(name), get_method(name)
    assert cls.name == name and cls.info is info
    assert cls.summary == info.summary and info.label
    assert cls.config_cls is info.config_cls and cls.mergeable == info.mergeable
    fields = {f.name for f in dataclasses.fields(info.config_cls)}
    assert info.budget_field is None or info.budget_field in fields
    for f in dataclasses.fields(info.config_cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_unknown_method():
    with pytest.raises(ValueError, match="choose from"):
        get_method("nope")
