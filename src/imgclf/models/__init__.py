"""Model families; importing this package registers the builder of every family in the catalog."""
import importlib as _importlib

from imgclf import catalog as _catalog

from .registry import build, create, names, register  # noqa: F401

for _family in _catalog.MODELS.values():
    _importlib.import_module(_family.module)
