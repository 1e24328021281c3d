"""ssmlm: state-space language models at character and byte level.

The Python API (``create_model``, the layers ``S4Layer``, ``S4DLayer``, ``S5Layer``, ``MambaLayer``, ``H3Layer``
and the encoder-decoder ``TransformerModel``) lives in :mod:`ssmlm.api`; it is imported on first use, so that
``import ssmlm`` for the command-line tools stays light.
"""

__version__ = "0.1.0"

_API = ("create_model", "S4Layer", "S4DLayer", "S5Layer", "MambaLayer", "H3Layer", "TransformerModel")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from ssmlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssmlm' has no attribute {name!r}")
