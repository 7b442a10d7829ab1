"""lmforge: build, pretrain, fine-tune, evaluate, store and serve transformer language models."""

from lmforge.api import LLM
from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams
from lmforge.model import Transformer
from lmforge.sizing import estimate, select
from lmforge.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "Config",
    "LmforgeError",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "estimate",
    "select",
]
__version__ = "0.1.0"
