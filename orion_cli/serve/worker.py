"""One rank's part of the engine: where it sits, its stage of the model, and how it executes plans.

Every rank loads its stage's slice of the model and executes the plans that
rank 0 broadcasts (rank.py is the process around it; rank 0 also runs the
scheduler and the HTTP server, driver.py). Ranks are placed by (node rank,
local rank) rather than by the rendezvous order, so stage 0 and the HTTP port
are on the node started with --node-rank 0 whatever order the nodes joined in.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from ..errors import UsageError
from .options import WorkerSpec
from .protocol import StepPlan
from .tp import TPGroup

log = logging.getLogger("orion_cli.serve")

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Result = TypeVar("Result")


@dataclass
class Topology:
    """Where this rank sits: its stage, its tensor-parallel index, and the ranks it talks to."""

    logical_rank: int
    global_rank: int
    world_size: int
    node_rank: int
    stage: int
    tp: TPGroup
    cpu_group: Any
    driver: int  # global rank of logical rank 0 (scheduler and HTTP)
    sampler: int  # global rank that samples (last stage, tp index 0)
    previous: int | None
    next: int | None
    pp: int

    @property
    def is_driver(self) -> bool:
        return self.global_rank == self.driver

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1


def build_topology(spec: WorkerSpec, node_rank: int, local_rank: int) -> Topology:
    world, me = dist.get_world_size(), dist.get_rank()
    cpu_group = dist.new_group(backend="gloo") if spec.backend != "gloo" else dist.group.WORLD
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (node_rank, local_rank, me, spec.agreement_key()), group=cpu_group)
    _check_agreement(everyone)
    order = [entry[2] for entry in sorted(everyone, key=lambda e: (e[0], e[1]))]  # logical -> global
    logical = order.index(me)
    stage, tp_rank = divmod(logical, spec.serve.tp)
    tp_group = None
    for s in range(spec.serve.pp):  # every rank creates every group, in the same order
        group = dist.new_group(order[s * spec.serve.tp:(s + 1) * spec.serve.tp]) if spec.serve.tp > 1 else None
        if s == stage:
            tp_group = group
    return Topology(
        logical_rank=logical, global_rank=me, world_size=world, node_rank=node_rank, stage=stage,
        tp=TPGroup(tp_rank, spec.serve.tp, tp_group), cpu_group=cpu_group, driver=order[0],
        sampler=order[(spec.serve.pp - 1) * spec.serve.tp], pp=spec.serve.pp,
        previous=order[logical - spec.serve.tp] if stage > 0 else None,
        next=order[logical + spec.serve.tp] if stage < spec.serve.pp - 1 else None,
    )


def _check_agreement(everyone: list[Any]) -> None:
    reference_node, _, _, reference = min(everyone, key=lambda e: (e[0], e[1]))
    for node, _, _, key in everyone:
        for flag, value in key.items():
            if value != reference[flag]:
                raise UsageError(f"{flag}: node {node} was started with {value} but node {reference_node} "
                                 f"with {reference[flag]}; start every node with the same settings")


class RankRuntime:
    """This rank's stage of the model, and how it takes part in each plan."""

    def __init__(self, spec: WorkerSpec, topology: Topology, device: torch.device):
        from transformers import AutoConfig

        from ..checkpoint import CheckpointReader
        from ..onnx_weights import OnnxWeights
        from .plans import Shape, recompute_position, split_layers
        from .sampling import Sampler
        from .stage import StageModel
        from .tp import WeightLoader

        self.spec = spec
        self.topology = topology
        self.device = device
        self.dtype = DTYPES[spec.serve.dtype]
        hf_config = AutoConfig.from_pretrained(spec.model_dir, trust_remote_code=spec.serve.trust_remote_code)
        self.shape = Shape.of(hf_config)
        self.recompute_at = recompute_position(hf_config)
        layer_range = split_layers(self.shape.num_layers, spec.serve.pp, spec.layer_counts)[topology.stage]
        reader = OnnxWeights(spec.onnx_file) if spec.onnx_file else CheckpointReader(spec.model_dir, flag="MODEL_DIR")
        with reader:
            self.stage = StageModel(hf_config, layer_range, topology.first, topology.last, topology.tp,
                                    WeightLoader(reader, self.dtype, device), spec.serve.max_batch_size,
                                    spec.max_model_len)
        self.layer_range = layer_range
        self.sampler = Sampler() if topology.global_rank == topology.sampler else None
        self.link = None
        if spec.serve.pp > 1:
            from ..codec import CodecPolicy
            from .stage_link import StageLink

            codec = spec.codec_settings
            policy = CodecPolicy.from_settings(spec.serve.activation_codec, codec)
            self.link = StageLink(policy, codec.stream_chunk_bytes, topology.cpu_group, topology.previous, topology.next)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Any:
        """Run this rank's part of `plan`; rank 0 gets the sampled tokens (or every rank's stats).

        All of it runs in inference mode, slot moves included: the cache's tensors are made
        there (torch refuses an in-place update of one outside it).
        """
        topo = self.topology
        for source, target in plan.moves:
            self.stage.cache.move(source, target)
        if self.sampler is not None:
            self.sampler.release(plan.release)
            self.sampler.admit(plan.admit)
        if plan.kind == "stats":
            return self._gather_stats()
        if not plan.has_work:
            return None
        sampled = self._forward(plan)
        if topo.sampler == topo.driver:
            return sampled
        # results carry log-probabilities and per-request errors: objects, not a tensor of token ids
        if topo.global_rank == topo.sampler:
            dist.send_object_list([sampled], dst=topo.driver, group=topo.cpu_group)
            return None
        if topo.is_driver:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=topo.sampler, group=topo.cpu_group)
            return box[0]
        return None

    def _forward(self, plan: StepPlan) -> list[Any] | None:
        from .attention import Step

        lengths = [len(t) for t in plan.tokens]
        step = Step.make(plan.kind == "prefill", plan.first_slot, lengths, plan.starts, self.device)
        scoring = plan.scores_prompts
        if self.topology.first:
            ids = torch.tensor([t + [0] * (step.width - len(t)) for t in plan.tokens], device=self.device)
            out = self.stage.step(step, tokens=ids, every_position=scoring and self.topology.last)
        else:
            out = self.stage.step(step, hidden=self.link.receive(lengths, self.device, self.dtype),
                                  every_position=scoring and self.topology.last)
        if not self.topology.last:
            self.link.send(out, lengths)
            return None
        if self.sampler is None:
            return None
        prompts = plan.tokens if plan.kind == "prefill" else None
        if not scoring:
            return self.sampler.sample(out, plan.request_ids, prompts)
        rows = torch.arange(len(lengths), device=out.device)
        last = out[rows, torch.tensor(lengths, device=out.device) - 1]
        wanted = self.sampler.wants_prompt_logprobs(plan.request_ids)
        every = [out[row, :length] if want else None for row, (length, want) in enumerate(zip(lengths, wanted))]
        return self.sampler.sample(last, plan.request_ids, prompts, every)

    def stats(self) -> dict[str, Any]:
        import psutil

        topo = self.topology
        stats = {
            "rank": topo.logical_rank, "global_rank": topo.global_rank, "node": topo.node_rank,
            "stage": topo.stage, "tp_rank": topo.tp.rank, "layers": [self.layer_range.start, self.layer_range.stop],
            "weight_bytes": self.stage.weight_bytes, "kv_cache_bytes": self.stage.cache.nbytes,
            "resident_bytes": psutil.Process().memory_info().rss, "pid": os.getpid(),
        }
        if self.link is not None:
            stats.update(self.link.stats())
        return stats

    def _gather_stats(self) -> list[dict[str, Any]] | None:
        mine = self.stats()
        if self.topology.world_size == 1:
            return [mine]
        everyone = [None] * self.topology.world_size if self.topology.is_driver else None
        dist.gather_object(mine, everyone, dst=self.topology.driver, group=self.topology.cpu_group)
        return everyone


class ComputeThread:
    """The one thread that runs rank 0's torch work: loading its stage, then every plan.

    Why: libgomp gives each thread that starts an OpenMP region a pool of its
    own. With the stage loaded on the main thread and the plans run on the
    scheduler's, the process holds two pools, more OpenMP threads than cores,
    and libgomp then stops spinning between parallel regions: each matmul's
    worker thread sleeps and is woken. On the 88M Llama (fp32, 1 row, 2 cores)
    that was 28533 context switches against 291 over 150 decode steps, and
    31 ms a step against 26. The other ranks run everything on their main thread.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orion-compute")

    def call(self, function: Callable[..., Result], *args: Any) -> Result:
        return self._executor.submit(function, *args).result()


def start_driver(spec: WorkerSpec, topology: Topology, device: torch.device) -> "DistributedRunner":
    """Rank 0's stage, loaded on the compute thread that will run its plans."""
    compute = ComputeThread()
    return DistributedRunner(compute.call(RankRuntime, spec, topology, device), compute)


class DistributedRunner:
    """The scheduler's StepRunner on rank 0: broadcast each plan, then take part in it on the compute thread."""

    def __init__(self, runtime: RankRuntime, compute: ComputeThread):
        self.runtime = runtime
        self.topology = runtime.topology
        self.compute = compute

    def run(self, plan: StepPlan) -> Any:
        if self.topology.world_size > 1:
            dist.broadcast_object_list([plan], src=self.topology.driver, group=self.topology.cpu_group)
        return self.compute.call(self.runtime.execute, plan)

    def shutdown(self) -> None:
        if self.topology.world_size > 1:
            dist.broadcast_object_list([StepPlan("stop")], src=self.topology.driver, group=self.topology.cpu_group)


def follow(runtime: RankRuntime) -> None:
    """Every rank but rank 0: execute plans until rank 0 says stop."""
    topo = runtime.topology
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=topo.driver, group=topo.cpu_group)
        plan: StepPlan = box[0]
        if plan.kind == "stop":
            return
        runtime.execute(plan)


def leave_process_group(code: int = 0) -> NoReturn:
    """Destroy the process group, then end this process without Python's finalization.

    Why: gloo's C++ threads can still be releasing tensors after the group is
    destroyed. One that asks for the GIL while the interpreter finalizes is ended
    with pthread_exit, and the unwinding aborts the whole process ("terminate
    called without an active exception"): a clean stop then reads as a crash
    (SIGABRT). Nothing of ours waits on finalization, so flush and leave.
    """
    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
