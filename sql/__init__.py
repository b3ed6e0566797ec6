"""Read-only SQL over the feature store (and the .sql files that assemble feature matrices)."""
