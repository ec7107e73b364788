"""orion serve: an OpenAI-compatible server over tensor- and pipeline-parallel torch.distributed workers.

Modules, from the outside in: launcher (the library call; torchrun's agent),
options (checks before any worker starts), control (agent <-> worker channel),
rank (one rank's process), driver (rank 0: scheduler and HTTP), worker (a
rank's place and its stage of the model), api (FastAPI routes), schemas
(request and error bodies), generation (a request body to the scheduler's
sequences), replies (response bodies and streams), scheduler (continuous
batching), metrics, stage / plans / attention / tp (any transformers model,
split by its plans), stage_link (stage-to-stage transfer), sampling
(penalties, sampling, log-probabilities), text, and for ONNX models in
onnxruntime, one process: onnx_serving (the engine's entry), onnx_attention
(the graph's attention as GroupQueryAttention), onnx_static (its static KV
cache), onnx_engine (the exported attention), prefix_cache."""

from .launcher import serve
from .options import ServeError, ServeSummary

__all__ = ["ServeError", "ServeSummary", "serve"]
