"""orion serve: an OpenAI-compatible server over tensor- and pipeline-parallel workers."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from ..config import ServeSettings, override
from .common import JsonOpt, RegistryOpt, VerboseOpt, info, progress, use
from .options import settings_options


@settings_options(ServeSettings, "serve")
def serve(
    model: Annotated[str, typer.Argument(metavar="MODEL_DIR|KEY", help="Model directory (safetensors, .bin, or an ONNX directory from orion quantize) or registry key.", show_default=False)],
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API until stopped (SIGTERM or Ctrl-C drain it).

    Workers are started by torchrun (torch.distributed.run): --tp ranks per
    stage, --pp stages, over --nnodes machines. Rank 0 serves /v1/completions,
    /v1/chat/completions, /v1/models, /health and /metrics. ONNX directories
    (orion quantize) are served by onnxruntime in one process; so is a
    checkpoint with --engine onnxruntime, after its fp32 ONNX export (made once,
    kept in cache_dir), and one the torch engine cannot run (StableLM). With
    --json, stdout carries one JSON line when the server is ready and one when
    it stops.

    Examples:

      orion serve ./tinyllama --port 8000

      orion serve prod-llama --tp 2 --api-key secret --json

      orion serve ./model --pp 2 --pp-split 10,14 --activation-codec int8+zstd

      # orion quantize's output: onnxruntime in one process, or its 4-bit blocks split over torch ranks
      orion serve ./model-q4
      orion serve ./model-q4 --tp 2

      # a checkpoint on onnxruntime: its fp32 ONNX export, made on the first start and reused
      orion serve ./tinyllama --engine onnxruntime

      # two machines, one stage each (run the first on 10.0.0.1):
      orion serve ./model --pp 2 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --host 0.0.0.0
      orion serve ./model --pp 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500
    """
    from ..serve import serve as run_server

    state = use(json_output, verbose)
    config = state.config()
    settings = override(config.serve, **(flags or {}))
    summary = run_server(model, settings, codec=config.codec, registry=state.registry_path(registry),
                         cache_dir=config.cache_path, verbose=state.verbose, progress=progress(),
                         on_event=lambda event: _print_event(event, state.json))
    _print_event(summary.as_dict(), state.json)
    if summary.drained is False:
        raise typer.Exit(1)


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    """JSON lines on stdout with --json; one human line on stderr otherwise."""
    if as_json:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()
        return
    kind = event.get("event")
    if kind == "ready":
        again = f" (after restart {event['restart']})" if event.get("restart") else ""
        layout = f"tp {event.get('tp', 1)} x pp {event.get('pp', 1)}, {event.get('backend', event.get('engine'))}"
        info(f"orion serve: {event['model']} ready at {event['url']}/v1 ({layout}){again}")
    elif kind == "joined":
        info(f"orion serve: node {event['node_rank']} joined (stage {event['stage']} of a {event['world_size']}-rank world)")
    elif kind == "stopped":
        how = f" by {event['stopped_by']}" if event.get("stopped_by") else ""
        info(f"orion serve: stopped{how}; {event['requests']} requests, {event['generated_tokens']} tokens generated, "
             f"{event['restarts']} restarts")
