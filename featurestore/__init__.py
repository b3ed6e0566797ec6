"""The bottom layer: config, the Parquet + DuckDB store, locks, errors, the feature-builder protocol and its
incremental runner, fingerprints, sparse tables and the fold plan. Imports nothing else of the project."""
