"""Model families; importing this package registers every builder."""
from . import (  # noqa: F401
    densenet,
    pyramidnet,
    resnet,
    resnet_preact,
    resnext,
    se_resnet_preact,
    shake_shake,
    vgg,
    wrn,
)
from .registry import build, create, names, register  # noqa: F401
