"""Tabular feature builders: raw rows -> items, folds, catalog fields, target encodings, sparse text, kNN prices."""
