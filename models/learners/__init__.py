"""The built-in base learners, one module each with its settings dataclass; `models.registry` imports every module
of this package (a new built-in learner is one more module here)."""
