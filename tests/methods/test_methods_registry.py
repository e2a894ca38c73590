"""The registry of methods (hvd_compress.methods.REGISTRY) is where the package's names come from:
every registered method is exported by the package, built by its spec name, checks its
arguments, and has a row in README's table of compressors (docs/adding-a-method.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import hvd_compress
from hvd_compress import methods
from hvd_compress.horovod import MethodCompressor
from hvd_compress.methods import REGISTRY, Method

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_method_is_exported_and_built_by_its_spec_name():
    assert len(REGISTRY) == 17
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Method) and cls.name == name
        exported = getattr(hvd_compress, cls.__name__)      # the method's Horovod compressor
        assert cls.__name__ in hvd_compress.__all__ and exported.__name__ == cls.__name__
        assert issubclass(exported, MethodCompressor) and exported.method_class is cls
        route = "compressed" if name in ("esgd", "laq", "diana") else "auto"
        built = hvd_compress.from_spec(f"{name}:route='{route}'")
        assert type(built) is exported and type(built.method) is cls and built.route == route
        assert type(methods.from_spec(f"{name}:route='{route}'")) is cls
        assert repr(built) == repr(built.method)


def test_every_method_has_a_row_in_the_readme():
    text = README.read_text()
    table = text[text.index("| compressor | method"):].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)\(", table, flags=re.M)
    assert sorted(rows) == sorted(cls.__name__ for cls in REGISTRY.values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shared_options_are_declared_once_and_checked(name):
    route = "compressed" if name in ("esgd", "laq", "diana") else "auto"
    with pytest.raises(ValueError, match="min_numel must be an integer"):
        hvd_compress.from_spec(f"{name}:route='{route}',min_numel=1.5")
    with pytest.raises(ValueError, match="hierarchy must be True, False or 'auto'"):
        hvd_compress.from_spec(f"{name}:route='{route}',hierarchy='yes'")
    assert "hierarchy=" in repr(hvd_compress.from_spec(f"{name}:route='{route}'"))
