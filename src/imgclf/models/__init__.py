"""Model families; importing this package registers every builder."""
from . import resnet_preact  # noqa: F401
from .registry import build, create, names, register  # noqa: F401
