"""Training data: loading, format conversion, chat templating, masking, packing, split and report."""

from ..errors import DataError
from .collator import DataCollator
from .conversation import Conversation, Message
from .formats import FORMATS, convert, detect_format
from .packing import pack
from .pipeline import PreparedData, build_datasets, load_examples
from .templating import IGNORE_INDEX, encode, ensure_chat_template

__all__ = [
    "DataError", "DataCollator", "Conversation", "Message", "FORMATS", "convert", "detect_format", "pack",
    "PreparedData", "build_datasets", "load_examples", "IGNORE_INDEX", "encode", "ensure_chat_template",
]
