"""The sharded KV store (MatrixKV) on log partitions."""
