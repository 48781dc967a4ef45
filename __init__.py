"""hdistill: Hybrid Distillation with precomputed teacher targets."""

__version__ = "0.1.0"
