"""Model definitions and learning: backbones, pooling, heads, losses, datasets, evaluation.

Importing `training` has no side effects (the numpy-only `training.evaluate` imports without torch).
The torchvision compatibility shim that lets timm import on CPU-only torch is installed by
`training.backbones`, the one module that imports timm (see training/_torchvision_compat.py).
"""
