"""An OpenAI-compatible server with continuous batching and a web playground: ``lmforge serve MODEL``.

from lmforge import LLM
from lmforge.serve import create_app
app = create_app(LLM.load(), api_key="secret")   # a FastAPI app; run it with uvicorn
"""

from lmforge.serve.app import create_app
from lmforge.serve.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
