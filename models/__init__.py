"""Base learners: the protocol and registry (`base`), the learners (`gbdt`, `mlp`, `linear`), their contract check
(`contract`), feature matrices from the store's tables (`matrix`) and out-of-fold cross-fitting (`train`)."""
