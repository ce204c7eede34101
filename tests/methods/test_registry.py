from pathlib import Path

import pytest

from shpeft.methods import METHODS, get_method

HERE = Path(__file__).parent


def test_every_method_has_a_test_file_with_the_generic_checks():
    text = "\n".join(p.read_text() for p in HERE.glob("test_*.py"))
    for name in METHODS:
        assert f'"{name}"' in text, f"method {name!r} has no check_method test"


def test_every_method_documents_itself():
    for name, cls in METHODS.items():
        assert cls.name == name and cls.summary
        import dataclasses

        for f in dataclasses.fields(cls.config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_unknown_method():
    with pytest.raises(ValueError, match="choose from"):
        get_method("nope")
