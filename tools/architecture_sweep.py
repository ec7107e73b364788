"""Every causal-LM class transformers has, at a tiny size: does orion export it and serve it as transformers runs it?

For each model type of transformers' causal-LM mapping outside the test table
(tests/tiny_models.py) whose class takes attention functions or has SDPA
attention over the standard decoder inputs, this builds a random model of
hidden size 64 and 2 layers from the config class's defaults (a model type
whose defaults do not shrink that way is reported and skipped), then checks:

- export: orion's fp32 ONNX export scores a prompt as transformers does (KL <
  1e-5) and decodes the same 8 greedy tokens with its cache;
- torch: orion serve's torch engine (real gloo process, tensor parallel size
  --tp) decodes the same 8 greedy tokens as transformers' generate().

Anything that fails says why, in one line. It is a survey, not a test: the
defaults of some configs are not a model anyone ships, so a failure is a lead
to follow, and an architecture earns its place in the test table once it
passes here.

    python tools/architecture_sweep.py /tmp/sweep [--tp 2] [model_type ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = [5, 17, 42, 99, 7, 130, 64, 3, 250, 11]
NEW_TOKENS = 8
MAX_PARAMETERS = 40e6  # a config whose defaults stay large at hidden size 64 (Gemma 3's vision tower) is skipped
# encoders and encoder-decoders transformers also maps to causal-LM heads, and multimodal models
NOT_DECODERS = set("""bart bert bert-generation big_bird bigbird_pegasus blenderbot blenderbot-small camembert
data2vec-text electra ernie marian mbart mega megatron-bert mvp pegasus plbart prophetnet qdqbert rembert roberta
roberta-prelayernorm roc_bert roformer xlm xlm-prophetnet xlm-roberta xlm-roberta-xl xmod trocr whisper
speech_to_text_2 musicgen musicgen_melody moshi git blt fuyu""".split())


def build(model_type: str, class_name: str, root: Path) -> str | None:
    """Write the tiny model of `model_type` under `root`; None, or why it was skipped."""
    import torch
    import transformers

    from tiny_models import build_model, config_of, tiny_shape

    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
        # grouped-query heads only where the model has them
        shape = tiny_shape() if hasattr(config_class(), "num_key_value_heads") else tiny_shape("num_key_value_heads")
        config = config_of(config_class.__name__, initializer_range=0.2, **shape)
        config.architectures = [class_name]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        if model.config.model_type != model_type:
            return f"its config builds {model.config.model_type}"
        if sum(p.numel() for p in model.parameters()) > MAX_PARAMETERS:
            return "its defaults stay large at hidden size 64"
        build_model(config, root / model_type)
    except Exception as exc:  # noqa: BLE001 - a config's defaults may fail anywhere
        return f"not built: {type(exc).__name__}: {str(exc)[:100]}"
    return None


def greedy(model_dir: Path) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(PROMPT):].tolist()


def check_export(model_dir: Path, expected: list[int]) -> str:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from orion_cli.onnx_decoder import OnnxDecoder
    from orion_cli.onnx_export.float_model import export_float_model
    from serve_testing import kl_divergence

    out = Path(tempfile.mkdtemp()) / "onnx"
    out.mkdir()
    try:
        export_float_model(model_dir, out)
    except Exception as exc:  # noqa: BLE001 - orion's one-line refusal, or the export's own failure
        return f"refused: {str(exc).splitlines()[0][:160]}"
    decoder = OnnxDecoder(out / "model.onnx")
    ours = decoder.logits(np.array([PROMPT]))[0]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([PROMPT]))
    kl = max(kl_divergence(theirs.logits[0, p].numpy(), ours[p]) for p in range(len(PROMPT)))
    decoded = decoder.greedy(PROMPT, NEW_TOKENS)
    return f"KL {kl:.1e}, decode {'same' if decoded == expected else 'DIFFERS'}" + ("" if kl < 1e-5 else " MISMATCH")


def check_torch(model_dir: Path, expected: list[int], tp: int) -> str:
    from engine_testing import run_layout

    try:
        got = run_layout(tp, 1, {"m": str(model_dir)}, [PROMPT], NEW_TOKENS, Path(tempfile.mkdtemp()))["m"]["alone"]
    except Exception as exc:  # noqa: BLE001 - a rank's error, its last line the reason
        reasons = [line for line in str(exc).splitlines() if "Error" in line]
        return f"refused: {(reasons or [type(exc).__name__])[-1][:200]}"
    return "same" if got[0] == expected else f"DIFFERS: {got[0]} vs {expected}"


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from orion_cli.onnx_export.graph import takes_standard_decoder_inputs
    from orion_cli.modeldir import inspect_model_dir
    from orion_cli.serve.options import torch_cannot_run
    from tiny_models import TINY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="where the tiny models are written")
    parser.add_argument("model_types", nargs="*", help="only these (default: all)")
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    in_table = {getattr(transformers, name).model_type for name, _ in TINY.values()}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        model_class = getattr(transformers, class_name, None)
        if model_type in in_table | NOT_DECODERS or model_class is None or \
                (args.model_types and model_type not in args.model_types) or \
                not takes_standard_decoder_inputs(model_class):
            continue
        skipped = build(model_type, class_name, args.root)
        if skipped:
            print(f"{model_type}: skipped, {skipped}", flush=True)
            continue
        model_dir = args.root / model_type
        try:
            expected = greedy(model_dir)
        except Exception as exc:  # noqa: BLE001
            print(f"{model_type}: skipped, transformers' generate() fails on these defaults ({type(exc).__name__})")
            continue
        engine = torch_cannot_run(inspect_model_dir(model_dir), trust_remote_code=False)
        torch_result = f"refused: {engine}" if engine else check_torch(model_dir, expected, args.tp)
        print(f"{model_type}: export {check_export(model_dir, expected)} | torch tp={args.tp} {torch_result}",
              flush=True)


if __name__ == "__main__":
    main()
