"""Hidden states from one pipeline stage to the next, through the activation codec.

Each rank of a stage sends to the rank with the same tensor-parallel index in
the next stage, over torch.distributed point-to-point on the CPU (gloo)
group: each frame's length, then the frame. Padding is stripped before
encoding (a batched prefill pads prompts to the longest), so the bytes on the
wire are those of real tokens only, and the receiver pads again. Hidden states
larger than codec.stream_chunk_bytes (a long prefill) go as a chunk stream, so
neither side ever holds a whole encoded copy beside the tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..codec import CodecMetrics, CodecPolicy, StreamDecoder, decode, encode, encode_chunks, inspect_frame


class StageLink:
    def __init__(self, policy: CodecPolicy, chunk_bytes: int, group: dist.ProcessGroup, previous: int | None,
                 next_: int | None):
        self.policy = policy
        self.chunk_bytes = chunk_bytes
        self.group = group
        self.previous = previous
        self.next = next_
        self.metrics = CodecMetrics()
        self.tokens_sent = 0

    def send(self, hidden: torch.Tensor, lengths: list[int]) -> None:
        """Send [rows, width, hidden] states of which row i holds lengths[i] real tokens."""
        packed = pack_rows(hidden, lengths).cpu()
        if packed.numel() * packed.element_size() > self.chunk_bytes:
            frames = encode_chunks(packed, self.policy, self.chunk_bytes, metrics=self.metrics)
        else:
            frames = [encode(packed, self.policy, metrics=self.metrics)]
        for frame in frames:
            payload = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst=self.next, group=self.group)
            dist.send(payload, dst=self.next, group=self.group)
        self.tokens_sent += sum(lengths)

    def receive(self, lengths: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        frame = self._receive_frame()
        chunk = inspect_frame(frame).chunk
        if chunk is None or chunk.count == 1:
            packed = decode(frame, metrics=self.metrics)
        else:
            stream = StreamDecoder(metrics=self.metrics)
            stream.feed(frame)
            while not stream.done:
                stream.feed(self._receive_frame())
            packed = stream.result()
        return unpack_rows(packed.to(device=device, dtype=dtype), lengths)

    def _receive_frame(self) -> memoryview:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=self.previous, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(payload, src=self.previous, group=self.group)
        return memoryview(payload.numpy())

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
