"""Expert parallelism: a model replica's routed experts spread over Ray workers on several nodes.

Modules, one job each: `group.py` (placement group + one Ray actor per worker + torch.distributed groups),
`worker.py` (the actor: loads its share, runs steps), `exchange.py` (all-to-all dispatch / compute / combine for
one MoE layer), `tensor_parallel.py` (sharding non-expert weights over a node's workers), `executor.py` (the
engine's Executor over the group), `s3.py` (S3 byte-range loading into a node-local cache).
"""
