"""lmforge: build, pretrain, fine-tune, evaluate, store and serve transformer language models.

The public names below are imported on first use (PEP 562): ``import lmforge`` stays cheap, so the command
line's ``--help`` and its store commands start without importing torch. ``from lmforge import LLM`` works as
before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from lmforge.api import LLM
    from lmforge.config import Config
    from lmforge.generate import SamplingParams
    from lmforge.model import Transformer
    from lmforge.sizing import estimate, select
    from lmforge.tokenizer import Tokenizer

# Each lazily imported public name and the module that defines it.
_LAZY = {
    "LLM": "lmforge.api",
    "Config": "lmforge.config",
    "SamplingParams": "lmforge.generate",
    "Transformer": "lmforge.model",
    "estimate": "lmforge.sizing",
    "select": "lmforge.sizing",
    "Tokenizer": "lmforge.tokenizer",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
