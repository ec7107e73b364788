"""orion serve: an OpenAI-compatible server over tensor- and pipeline-parallel torch.distributed workers.

Modules, from the outside in: launcher (the library call; torchrun's agent),
options (checks before any worker starts), control (agent <-> worker channel),
rank (one rank's process), driver (rank 0: scheduler and HTTP), worker (a
rank's place and its stage of the model), api (FastAPI routes), scheduler
(continuous batching), metrics, model / tp / architectures (the sharded
decoder), stage_link (stage-to-stage transfer), sampling, text, onnx_engine
(quantized ONNX models in onnxruntime, one process).
"""

from .launcher import serve
from .options import ServeError, ServeSummary

__all__ = ["ServeError", "ServeSummary", "serve"]
