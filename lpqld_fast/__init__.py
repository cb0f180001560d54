"""lpqld_fast: large-scale dataset distillation with soft-label pruning and quantization."""
__version__ = "0.1.0"
