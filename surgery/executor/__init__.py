"""Out-of-core execution of a plan: the model's skeleton stays on the meta device, weights are
read block by block from memory-mapped safetensors shards in the checkpoint's dtype, transformed
by the plan's passes, written to output shards and freed (docs/scale.md).

Modules, one job each:

- ``checkpoint``: a lazy safetensors checkpoint (headers only; a tensor read on demand; truncated
  shards detected at the read that needs them).
- ``writer``: sharded safetensors output with an index, tensor by tensor, bounded memory.
- ``memory``: the peak memory estimate, from config.json alone.
- ``residency``: a meta skeleton whose parameters are onloaded and offloaded by unit (a block).
- ``schedule``: groups plan steps into streamed stages by their declared ``Granularity``.
- ``run``: executes a streamed plan and writes the output directory.
"""
