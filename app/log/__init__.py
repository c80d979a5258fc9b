"""The shared-log engine: a JetStream stream as the log, a batcher to append, an applier to apply in order."""
