"""dwmtrain: LLM pretraining with a Data Weighting Model (arXiv 2507.16178) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
