"""Storage: SQLite for applied state, DuckDB for time series, snapshot stores."""
