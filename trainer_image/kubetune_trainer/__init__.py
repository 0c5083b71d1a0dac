"""kubetune_trainer: turns a kubetune training plan into a fine-tuning run (transformers + peft, its own training loop)."""

__version__ = "0.1.0"
PLAN_VERSION = 1
SUMMARY_VERSION = 1
