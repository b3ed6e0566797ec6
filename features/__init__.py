"""Feature builders: raw rows -> feature tables (items, folds, catalog, embeddings, kNN prices)."""
