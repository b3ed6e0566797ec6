"""Core of the feature store: configuration, the Parquet + DuckDB store, and the build runner."""
