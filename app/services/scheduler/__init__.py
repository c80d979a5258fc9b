"""The shard scheduler: clusters of data nodes, shard placement, procedures and the schedulers (issue 20)."""
