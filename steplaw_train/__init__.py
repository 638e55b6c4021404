"""steplaw-train: one Step Law run (spec → megatron-core training → run directory)."""

__version__ = "0.1.0"
