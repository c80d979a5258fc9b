"""The registry: ZooKeeper-style znodes on the shared log, sessions, watches and recipes."""
