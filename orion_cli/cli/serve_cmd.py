"""orion serve: an OpenAI-compatible server over tensor- and pipeline-parallel workers."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from .common import JsonOpt, RegistryOpt, VerboseOpt, info, pick, use


def serve(
    model: Annotated[str, typer.Argument(metavar="MODEL_DIR|KEY", help="Model directory (safetensors, .bin, or an ONNX directory from orion quantize) or registry key.", show_default=False)],
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel ranks per pipeline stage.", show_default=False)] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", help="Pipeline stages (typically one per node).", show_default=False)] = None,
    pp_split: Annotated[Optional[str], typer.Option("--pp-split", metavar="N,M,..", help="Layers per stage, e.g. 10,14 (default: even).", show_default=False)] = None,
    nnodes: Annotated[Optional[int], typer.Option("--nnodes", help="Machines taking part; run orion serve on each.", show_default=False)] = None,
    node_rank: Annotated[Optional[int], typer.Option("--node-rank", help="This machine's place (0 serves HTTP).", show_default=False)] = None,
    master_addr: Annotated[Optional[str], typer.Option("--master-addr", help="Rendezvous host (node 0's address).", show_default=False)] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port", help="Rendezvous port on node 0.", show_default=False)] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to bind (default 127.0.0.1).", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port (0 picks a free one).", show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes.", show_default=False)] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", metavar="auto|nccl|gloo", help="torch.distributed backend (auto: nccl with CUDA).", show_default=False)] = None,
    activation_codec: Annotated[Optional[str], typer.Option("--activation-codec", metavar="CODEC", help="raw|zstd|fp16|bf16|int8[+zstd]|auto, between pipeline stages.", show_default=False)] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Requests decoded together.", show_default=False)] = None,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="Prompt + completion tokens per request.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="float32|float16|bfloat16", help="Weight and activation dtype.", show_default=False)] = None,
    max_restarts: Annotated[Optional[int], typer.Option("--max-restarts", help="Restarts of the worker group after a failure.", show_default=False)] = None,
    drain_timeout: Annotated[Optional[float], typer.Option("--drain-timeout", help="Seconds SIGTERM waits for in-flight requests.", show_default=False)] = None,
    registry: RegistryOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API until stopped (SIGTERM or Ctrl-C drain it).

    Workers are started by torchrun (torch.distributed.run): --tp ranks per
    stage, --pp stages, over --nnodes machines. Rank 0 serves /v1/completions,
    /v1/chat/completions, /v1/models, /health and /metrics. ONNX directories
    (orion quantize) are served by onnxruntime in one process. With --json,
    stdout carries one JSON line when the server is ready and one when it stops.

    Examples:

      orion serve ./tinyllama --port 8000

      orion serve prod-llama --tp 2 --api-key secret --json

      orion serve ./model --pp 2 --pp-split 10,14 --activation-codec int8+zstd

      # two machines, one stage each (run the first on 10.0.0.1):
      orion serve ./model --pp 2 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --host 0.0.0.0
      orion serve ./model --pp 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500
    """
    from ..serve import ServeOptions, serve as run_server

    state = use(json_output, verbose)
    settings, codecs = state.config().serve, state.config().codec
    options = ServeOptions(
        model=model, registry=state.registry_path(registry),
        tp=pick(tp, settings.tp), pp=pick(pp, settings.pp), pp_split=pick(pp_split, settings.pp_split),
        nnodes=pick(nnodes, settings.nnodes), node_rank=pick(node_rank, settings.node_rank),
        master_addr=pick(master_addr, settings.master_addr), master_port=pick(master_port, settings.master_port),
        host=pick(host, settings.host), port=pick(port, settings.port), api_key=pick(api_key, settings.api_key),
        backend=pick(backend, settings.backend), activation_codec=pick(activation_codec, settings.activation_codec),
        codec_threshold_bytes=codecs.auto_threshold_bytes, codec_int8_block_size=codecs.int8_block_size,
        codec_zstd_level=codecs.zstd_level, max_batch_size=pick(max_batch_size, settings.max_batch_size),
        max_model_len=pick(max_model_len, settings.max_model_len), dtype=pick(dtype, settings.dtype),
        max_restarts=pick(max_restarts, settings.max_restarts),
        drain_timeout=pick(drain_timeout, settings.drain_timeout), verbose=state.verbose,
    )
    summary = run_server(options, on_event=lambda event: _print_event(event, state.json))
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
