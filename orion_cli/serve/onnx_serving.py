"""`orion serve` on an ONNX directory: onnxruntime in one process, behind the same API and scheduler.

The runner is the static-cache one (onnx_static.py) when the graph's
attention can be rewritten as GroupQueryAttention (onnx_attention.py), else
the exported graph's own attention (onnx_engine.py), with the reason logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..onnx_decoder import OnnxDecoder
from .onnx_engine import OnnxRunner
from .onnx_static import StaticCacheRunner
from .options import ServeError, ServeJob, ServeSummary, decoder_file
from .plans import recompute_position

log = logging.getLogger("orion_cli.serve")


def onnx_runner(graph, text_config, *, attention: str, max_batch_size: int, max_model_len: int,
                prefix_cache_bytes: int, recompute_at: int | None) -> OnnxRunner:
    """The static-cache runner over the graph with GroupQueryAttention where the rewrite applies (`attention`
    "auto"), else the exported graph's own attention; `runner.attention` says which, and why. Either way, quantized
    projections reading one input run as one product (onnx_fusion.py)."""
    import onnx

    from .onnx_attention import Heads, NotRewritten, rewrite_attention
    from .onnx_fusion import fuse_projections

    model = onnx.load(str(graph), load_external_data=False)
    heads = text_config.num_attention_heads
    declared_kv_heads, declared_head_dim = _declared_cache_shape(model)
    kv_heads = declared_kv_heads or getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = declared_head_dim or getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    try:
        if attention == "exported":
            raise NotRewritten("--onnx-attention exported")
        rotary = getattr(text_config, "rope_theta", None) is not None or getattr(text_config, "rope_scaling", None)
        if not rotary or getattr(text_config, "alibi", False):
            raise NotRewritten("positions that are not rotary: a bias on the attention mask, which the rewrite "
                               "replaces, may carry them (ALiBi)")
        # a rope whose factors change past a length (Phi-3's longrope) has no one table per position
        rewritten = rewrite_attention(model, Heads(heads, kv_heads, head_dim), sliding_windows(text_config),
                                      rotary_positions=max_model_len if recompute_at is None else None,
                                      base_dir=Path(graph).parent)
        fused = fuse_projections(rewritten.graph)
        try:  # a graph the rewrite misread fails here, at load, rather than on the first request
            runner = StaticCacheRunner(OnnxDecoder(graph, graph=rewritten.SerializeToString()), slots=max_batch_size,
                                       max_len=max_model_len, kv_heads=kv_heads, head_dim=head_dim,
                                       prefix_cache_bytes=prefix_cache_bytes, recompute_at=recompute_at)
            runner.probe()
            if any(attribute.name == "do_rotary" for node in rewritten.graph.node for attribute in node.attribute):
                runner.attention += ", rotary embedding folded in"
            runner.fused_projections = fused
            return runner
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many kinds
            raise NotRewritten(f"onnxruntime refused the rewritten graph: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
    except NotRewritten as why:
        fused = fuse_projections(model.graph)
        decoder = OnnxDecoder(graph, graph=model.SerializeToString()) if fused else OnnxDecoder(graph)
        runner = OnnxRunner(decoder, prefix_cache_bytes, recompute_at)
        runner.attention, runner.fused_projections = f"exported ({why})", fused
        return runner


def _declared_cache_shape(model) -> tuple[int | None, int | None]:
    """(key/value heads, head size) as the graph's first present output declares them, where it fixes them: the
    export's, not the config's (FalconConfig's num_key_value_heads need not be what a multi-query model caches)."""
    from .onnx_graph import declared_dims

    present = next((o.name for o in model.graph.output if o.name.startswith("present.")), None)
    dims = declared_dims(model.graph, present) if present is not None else []
    return (dims[1], dims[3]) if len(dims) == 4 else (None, None)


def sliding_windows(text_config) -> dict[int, int]:
    """{layer: window} of the layers that attend through a sliding window, as transformers' masks apply them."""
    window = getattr(text_config, "sliding_window", None)
    if not window or getattr(text_config, "use_sliding_window", True) is False:
        return {}
    types = getattr(text_config, "layer_types", None)
    layers = range(text_config.num_hidden_layers)
    return {i: window for i in layers if types is None or types[i] == "sliding_attention"}


def check_onnx_options(settings, model) -> None:
    """What the onnxruntime engine cannot do, refused before any export or load."""
    ignored = [flag for flag, value, neutral in (("--tp", settings.tp, 1), ("--pp", settings.pp, 1),
                                                 ("--nnodes", settings.nnodes, 1),
                                                 ("--pp-split", settings.pp_split, None))
               if value != neutral]
    if ignored:
        raise UsageError(f"{'/'.join(ignored)}: the onnxruntime engine serves {model.root} in one process; "
                         "use --engine torch (or auto) to serve it with tensor/pipeline parallelism")
    if settings.dtype != "float32":
        log.warning("--dtype %s: ignored by the onnxruntime engine, which runs ONNX models in the dtypes they "
                    "were exported with (a checkpoint's export is fp32)", settings.dtype)


def serve_onnx(job: ServeJob, model, model_id: str, entry: dict[str, Any] | None, on_event,
               source=None) -> ServeSummary:
    """Serve an ONNX directory in this process until SIGTERM/SIGINT; `source` is the checkpoint it was exported
    from, when it is orion's export of one (onnx_cache.py)."""
    from .control import bind_listening_socket
    from .driver import eos_token_ids, serve_http

    settings = job.settings
    check_onnx_options(settings, source or model)
    from transformers import AutoConfig, AutoTokenizer

    graph = decoder_file(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        config = AutoConfig.from_pretrained(model.path)
        text_config = config.get_text_config()
        max_positions = getattr(text_config, "max_position_embeddings", None) or settings.max_model_len
        max_model_len = min(settings.max_model_len, max_positions)
        runner = onnx_runner(graph, text_config, attention=settings.onnx_attention,
                             max_batch_size=settings.max_batch_size, max_model_len=max_model_len,
                             prefix_cache_bytes=settings.prefix_cache_mib * 2**20,
                             recompute_at=recompute_position(config))
    except UsageError:  # a graph without key/value cache inputs: the user's to fix, exit code 2
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime and transformers raise many kinds
        where = f"{source.root} (its ONNX export {model.path})" if source is not None else model.root
        raise ServeError(f"MODEL_DIR {where}: cannot be loaded by onnxruntime "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    runner.weight_bytes = model.weight_bytes
    log.info("onnxruntime engine: attention %s; %d groups of quantized projections fused", runner.attention,
             runner.fused_projections)
    if max_model_len < settings.max_model_len:
        log.warning("--max-model-len %d exceeds the model's %d positions; using %d",
                    settings.max_model_len, max_positions, max_model_len)
    try:
        sock = bind_listening_socket(settings.host, settings.port)
    except OSError as exc:
        raise ServeError(f"--host {settings.host} --port {settings.port}: cannot listen there "
                         f"({exc.strerror})") from None
    from .api import ServedModel

    quantization = (model.metadata or {}).get("quantization")
    served = ServedModel(
        id=model_id, root=str((source or model).path.resolve()), max_model_len=max_model_len, tokenizer=tokenizer,
        vocab_size=text_config.vocab_size,
        metadata={"orion": {"engine": "onnxruntime", "attention": runner.attention,
                            "fused_projections": runner.fused_projections,
                            "architecture": model.architecture,
                            **({"onnx_export": str(model.path)} if source is not None else {}),
                            **({"quantization": quantization} if quantization else {}),
                            **({"registry": entry} if entry else {})}},
    )
    summary = ServeSummary(model_id, "onnxruntime", None, 1, 0, 1, 1)
    with sock:
        result = serve_http(runner, served, sock, eos=eos_token_ids(model.path, tokenizer),
                            max_batch_size=settings.max_batch_size, api_key=settings.api_key,
                            drain_timeout=settings.drain_timeout,
                            max_request_bytes=settings.max_request_bytes, verbose=job.verbose,
                            announce=lambda event: event.get("event") == "summary" or on_event(event),
                            describe={"engine": "onnxruntime", "tp": 1, "pp": 1})
    summary.url = result["url"]
    summary.requests, summary.generated_tokens = result["requests"], result["generated_tokens"]
    summary.stopped_by, summary.drained = result["stopped_by"], result["drained"]
    if result["failure"]:
        raise ServeError(f"onnxruntime failed: {result['failure']}")
    return summary
