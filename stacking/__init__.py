"""Optuna-tuned stacking meta-learner — not built yet (issue 5); the package exists so the project layout
installs."""
