"""kubetune: a Kubernetes operator that fine-tunes large language models (operator side, torch-free)."""

__version__ = "0.1.0"
API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
