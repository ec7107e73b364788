"""One onnxruntime session over a decoder exported with past key values: the one way orion runs ONNX.

quantize's --test and calibration, and serve's onnxruntime engine, all go
through it. The cache's shape (key/value heads, head size, dtype) is read
from the graph's present outputs, never from the config: Qwen3's and Gemma's
head size is not hidden ÷ heads, and grouped-query models have fewer
key/value heads than attention heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxDecoder:
    def __init__(self, model: str | Path, threads: int | None = None, extra_inputs: Iterable[str] = (),
                 graph: bytes | None = None):
        """`graph`: a rewritten copy of `model`'s graph to run instead (serve/onnx_attention.py), its external
        data still read from beside `model`."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if graph is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(model).resolve().parent))
        self.session = ort.InferenceSession(graph if graph is not None else str(model), options,
                                            providers=["CPUExecutionProvider"])
        extra = set(extra_inputs)
        inputs = {i.name: i for i in self.session.get_inputs() if i.name not in extra}
        self.input_names = set(inputs)
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [name for name in self.present_names if name not in outputs]
        if missing:
            raise ValueError(f"{model}: no present outputs for {missing[:2]}; export with past key values")
        self.layers = len(self.past_names) // 2
        self.past_dtype = NUMPY_TYPES.get(inputs[self.past_names[0]].type, np.float32) if self.past_names else np.float32
        # (heads, head size) of each past input, as its present output declares them: values may have a head size of
        # their own (DeepSeek's multi-head latent attention caches keys of 192 and values of 128)
        self.cache_shapes = [tuple(d if isinstance(d, int) else None for d in (shape[1], shape[3]))
                             for shape in (outputs[name].shape for name in self.present_names)]
        logits = outputs.get("logits")
        self.logits_dtype = NUMPY_TYPES.get(logits.type, np.float32) if logits is not None else np.float32
        self.vocab_size = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else None
        self.extra = extra

    def empty_past(self, batch: int) -> list[np.ndarray]:
        if any(None in shape for shape in self.cache_shapes):  # a graph that declares no sizes: learn them from a step
            _, presents = self.run(np.zeros((1, 1), np.int64), None, None, None)
            self.cache_shapes = [(present.shape[1], present.shape[3]) for present in presents]
        return [np.zeros((batch, heads, 0, size), dtype=self.past_dtype) for heads, size in self.cache_shapes]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, position_ids: np.ndarray | None,
            past: list[np.ndarray] | None, extra: Mapping[str, np.ndarray] | None = None,
            with_presents: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [B, T, vocab], presents) for one step; masks and positions default to all-ones and 0..T-1
        after the past."""
        past = past if past is not None else self.empty_past(input_ids.shape[0])
        feed = self._feed(input_ids, attention_mask, position_ids, past[0].shape[2] if past else 0, extra)
        feed.update(zip(self.past_names, past))
        names = ["logits"] + (self.present_names if with_presents else [])
        outputs = self.session.run(names, feed)
        return outputs[0], outputs[1:]

    def run_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  past: list) -> tuple[np.ndarray, list]:
        """One step through IO binding: `past` may be the OrtValues a previous run_bound returned, fed back
        without a copy; returns (logits as numpy, presents as OrtValues in onnxruntime's memory)."""
        binding = self.session.io_binding()
        for name, value in self._feed(input_ids, attention_mask, position_ids, 0, None).items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in ["logits", *self.present_names]:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def _feed(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, position_ids: np.ndarray | None,
              cached: int, extra: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        batch, length = input_ids.shape
        feed = {"input_ids": input_ids}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = attention_mask if attention_mask is not None else \
                np.ones((batch, cached + length), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = position_ids if position_ids is not None else \
                np.broadcast_to(np.arange(cached, cached + length, dtype=np.int64), (batch, length)).copy()
        if "use_cache_branch" in self.input_names:
            feed["use_cache_branch"] = np.array([cached > 0 or attention_mask is not None and
                                                 attention_mask.shape[1] > length])
        if extra:
            feed.update(extra)
        return feed

    def logits(self, input_ids: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits of every position of [B, T] windows, with no past."""
        return self.run(input_ids, None, None, None, extra, with_presents=False)[0]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
        """Greedy decoding with the cache, as generate() does it: stops at an eos token (not returned)."""
        logits, past = self.run(np.array([prompt], dtype=np.int64), None, None, None)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            logits, past = self.run(np.array([[token]], dtype=np.int64), None, None, past)
        return out
