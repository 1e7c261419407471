"""retrieval-sdk runtime: preprocessing, on-device embedding, gallery index, server and client.

Never imports torch: a phone-side or app-server user installs this without the `train` extra.
"""

from sdk.preprocess import PreprocessSpec, load_image, preprocess_batch, preprocess_image

__all__ = ["PreprocessSpec", "load_image", "preprocess_image", "preprocess_batch"]
__version__ = "0.1.0"
