"""Model definitions and learning: backbones, pooling, heads, losses, datasets, evaluation.

Importing `training` first installs the torchvision compatibility shim so that timm imports on
CPU-only torch (see training/_torchvision_compat.py).
"""

from training import _torchvision_compat  # noqa: F401  (must precede any timm/torchvision import)
