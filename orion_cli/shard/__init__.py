"""orion shard: a checkpoint split into shards in execution order, with a manifest for progressive loading.

plan.py     the order of tensors (embeddings, layers by number, head) and the split by count or size
io.py       byte ranges copied into shard files by the kernel, hashed as they go
onnx.py     an ONNX model's external data as the source, and its rewritten model.onnx
outputs.py  manifest, Hugging Face index, metadata and SHARDING_INFO.md
load.py     reading a sharded directory back: verification, progressive loading
sharder.py  shard_model(), which runs all of it inside the producing frame
"""

from .load import ShardInfo, VerifyResult, iter_shards, verify_sharded_dir
from .outputs import ShardRecord, ShardResult
from .sharder import shard_model

__all__ = ["ShardInfo", "ShardRecord", "ShardResult", "VerifyResult", "iter_shards", "shard_model",
           "verify_sharded_dir"]
