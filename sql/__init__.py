"""Read-only SQL over the feature store: a sandboxed DuckDB connection that sees only the store's tables."""
