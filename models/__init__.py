"""Base learners (LightGBM, XGBoost, CatBoost, MLP) — not built yet (issue 5); the package exists so the
project layout installs."""
