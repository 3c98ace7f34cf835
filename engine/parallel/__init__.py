"""Tensor parallelism: process groups (group.py), weight shards (sharding.py), sharded layers
(layers.py), rank processes and the per-step broadcast from rank 0 (ranks.py, step.py)."""
