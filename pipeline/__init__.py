"""Composition: the registries that put feature builders, embeddings, learners and the stack together, and the
commands that run them (train, stack, predict). The only layer that imports all the others below the CLI."""
