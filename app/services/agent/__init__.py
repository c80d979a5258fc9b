"""The per-host agent: host figures, port usage, engine scan, log cleanup and network status."""
