"""retrieval-sdk runtime: preprocessing, on-device embedding, gallery index, server and client.

Never imports torch: a phone-side or app-server user installs this without the `train` extra.
`Embedder`, `GalleryIndex`, `Client` (and their companions) load on first use, so `import sdk` stays cheap.
"""

from sdk.preprocess import PreprocessSpec, load_image, preprocess_batch, preprocess_image

_LAZY = {
    "Embedder": "sdk.embedder",
    "GalleryIndex": "sdk.index",
    "IndexConfig": "sdk.index",
    "Hit": "sdk.index",
    "Client": "sdk.client",
    "SearchResult": "sdk.client",
    "SearchHit": "sdk.client",
}

__all__ = ["PreprocessSpec", "load_image", "preprocess_image", "preprocess_batch", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
