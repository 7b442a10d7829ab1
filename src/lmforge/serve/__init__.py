"""An OpenAI-compatible server with continuous batching and a web playground: ``lmforge serve MODEL``.

from lmforge import LLM
from lmforge.serve import create_app
app = create_app(LLM.load(), api_key="secret")   # a FastAPI app
uvicorn.Server(uvicorn_config(app, "127.0.0.1", 8000)).run()   # with the connection limits of ServerLimits
"""

from lmforge.serve.app import create_app
from lmforge.serve.limits import ServerLimits, uvicorn_config
from lmforge.serve.scheduler import Scheduler

__all__ = ["Scheduler", "ServerLimits", "create_app", "uvicorn_config"]
