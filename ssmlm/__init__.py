"""ssmlm: state-space language models at character and byte level."""

__version__ = "0.1.0"
