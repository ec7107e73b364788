"""Hidden states from one pipeline stage to the next, through the activation codec.

Each rank of a stage sends to the rank with the same tensor-parallel index in
the next stage, over torch.distributed point-to-point on the CPU (gloo)
group: first the frame's length, then the frame. Padding is stripped before
encoding (a batched prefill pads prompts to the longest), so the bytes on the
wire are those of real tokens only, and the receiver pads again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..codec import CodecMetrics, CodecPolicy, decode, encode


class StageLink:
    def __init__(self, policy: CodecPolicy, group: dist.ProcessGroup, previous: int | None, next_: int | None):
        self.policy = policy
        self.group = group
        self.previous = previous
        self.next = next_
        self.metrics = CodecMetrics()
        self.tokens_sent = 0

    def send(self, hidden: torch.Tensor, lengths: list[int]) -> None:
        """Send [rows, width, hidden] states of which row i holds lengths[i] real tokens."""
        packed = pack_rows(hidden, lengths)
        frame = encode(packed.cpu(), self.policy, metrics=self.metrics)
        payload = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst=self.next, group=self.group)
        dist.send(payload, dst=self.next, group=self.group)
        self.tokens_sent += sum(lengths)

    def receive(self, lengths: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=self.previous, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(payload, src=self.previous, group=self.group)
        packed = decode(memoryview(payload.numpy()), metrics=self.metrics)
        return unpack_rows(packed.to(device=device, dtype=dtype), lengths)

    def stats(self) -> dict:
        return {"codecs": self.metrics.snapshot()["codecs"], "activation_tokens": self.tokens_sent}


def pack_rows(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[sum(lengths), hidden]: each row's real tokens, padding dropped."""
    rows, width, size = hidden.shape
    if all(n == width for n in lengths):
        return hidden.reshape(rows * width, size)
    return torch.cat([hidden[row, :n] for row, n in enumerate(lengths)])


def unpack_rows(packed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    rows, width = len(lengths), max(lengths)
    if all(n == width for n in lengths):
        return packed.view(rows, width, -1)
    hidden = packed.new_zeros(rows, width, packed.shape[-1])
    offset = 0
    for row, n in enumerate(lengths):
        hidden[row, :n] = packed[offset:offset + n]
        offset += n
    return hidden
