"""SMAPE, the challenge metric, in percent (0 = perfect, 200 = worst)."""

from __future__ import annotations

import numpy as np


def smape(true_price: np.ndarray, predicted_price: np.ndarray) -> float:
    true_price = np.asarray(true_price, dtype=np.float64)
    predicted_price = np.asarray(predicted_price, dtype=np.float64)
    denominator = np.abs(true_price) + np.abs(predicted_price)
    ratio = np.divide(2.0 * np.abs(predicted_price - true_price), denominator,
                      out=np.zeros_like(denominator), where=denominator > 0)
    return float(100.0 * ratio.mean())


def to_price(prediction: np.ndarray, target: str) -> np.ndarray:
    """Model output -> price; "log1p" models predict log1p(price). Prices are kept strictly positive."""
    if target == "log1p":
        price = np.expm1(prediction)
    elif target == "none":
        price = np.asarray(prediction, dtype=np.float64)
    else:
        raise ValueError(f"models.target = {target!r}; expected 'log1p' or 'none'")
    return np.clip(price, 0.01, None)


def to_target(price: np.ndarray, target: str) -> np.ndarray:
    if target == "log1p":
        return np.log1p(price)
    if target == "none":
        return np.asarray(price, dtype=np.float64)
    raise ValueError(f"models.target = {target!r}; expected 'log1p' or 'none'")
