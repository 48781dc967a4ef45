"""hdistill: Hybrid Distillation with precomputed teacher targets."""

__version__ = "0.1.0"


def open_store(path: str, format: str | None = None):
    """A complete store (a local folder or an s3://, gs://, http(s):// URL) opened for reading: its `manifest`,
    `targets`, and `loader(batch_size, ...)`, the batches `hdistill train` steps on (hdistill.train.loader)."""
    from hdistill.train.loader import open_store as _open_store
    return _open_store(path, format)
