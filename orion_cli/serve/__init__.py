"""orion serve: an OpenAI-compatible server over tensor- and pipeline-parallel torch.distributed workers.

Modules, from the outside in: launcher (the library call; torchrun's agent),
options (checks before any worker starts), control (agent <-> worker channel),
worker (one rank), driver (rank 0: scheduler and HTTP), api (FastAPI routes),
scheduler (continuous batching), metrics, model / tp / architectures (the
sharded decoder), pipeline (stage-to-stage transfer), sampling, text,
onnx_engine (quantized ONNX models in onnxruntime, one process).
"""

from .launcher import ServeError, ServeSummary, serve
from .options import ServeOptions

__all__ = ["ServeError", "ServeOptions", "ServeSummary", "serve"]
