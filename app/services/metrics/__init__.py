"""Metrics: time series in DuckDB, fed in batches from a JetStream stream, with retention and rollups."""
