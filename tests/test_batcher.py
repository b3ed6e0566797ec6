"""`serve`'s adaptive batching (pipeline.serve.Batcher) on a stand-in predictor: requests waiting together are
priced in one call and each gets its own rows back; a bad request fails alone; clashing ids and other columns
wait for another batch; a closed batcher (after a reload) ends its worker and still answers late requests; clients
answered together and sending again a few ms apart are gathered into one batch again."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from featurestore.errors import InputError
from pipeline.serve import Batcher


class _Slow:
    """Prices a row at 2 x its `x`, taking 50 ms per call; a row with x < 0 is bad input. Records each call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def predict(self, raw: pl.DataFrame, source: str = "request", learners: bool = False) -> pl.DataFrame:
        self.calls.append(raw["id"].to_list())
        time.sleep(0.05)
        x = raw["x"].cast(pl.Float64)  # an all-null JSON column comes typed Null
        if (x < 0).any():
            raise InputError(f"{source}: row {int((x < 0).arg_max()) + 1}: column x is negative")
        out = raw.select(pl.col("id").alias("sample_id"), (x * 2.0).alias("price"))
        return out.with_columns(pred_a=pl.col("price") + 1) if learners else out


def _send_together(batcher: Batcher, frames: list[pl.DataFrame]) -> list[pl.DataFrame | Exception]:
    results: list[pl.DataFrame | Exception] = [pl.DataFrame()] * len(frames)
    start = threading.Barrier(len(frames))

    def send(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.predict(frames[i], learners=i == 1)
        except Exception as exc:  # noqa: BLE001  the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(frames))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_waiting_requests_share_a_call_and_each_gets_its_own_rows() -> None:
    predictor = _Slow()
    batcher = Batcher(predictor, "id")  # type: ignore[arg-type]
    frames = [pl.DataFrame({"id": [i], "x": [float(i)]}) for i in range(12)] + [
        pl.DataFrame({"id": [100, 101], "x": [1.5, 2.5]})]
    results = _send_together(batcher, frames)
    for frame, result in zip(frames, results, strict=True):
        assert isinstance(result, pl.DataFrame)
        assert result["sample_id"].to_list() == frame["id"].to_list()
        assert result["price"].to_list() == [2 * x for x in frame["x"].to_list()]
    assert results[1].columns == ["sample_id", "price", "pred_a"] and results[0].columns == ["sample_id", "price"]
    assert len(predictor.calls) < len(frames), predictor.calls  # some requests were priced together
    assert batcher.counts["requests"] == len(frames) and batcher.counts["batches"] == len(predictor.calls)


def test_a_bad_request_fails_alone_and_clashing_ids_or_columns_are_not_batched_together() -> None:
    predictor = _Slow()
    batcher = Batcher(predictor, "id")  # type: ignore[arg-type]
    frames = [pl.DataFrame({"id": [1], "x": [1.0]}), pl.DataFrame({"id": [2], "x": [-1.0]}),
              pl.DataFrame({"id": [1], "x": [3.0]}), pl.DataFrame({"id": [4], "x": [4.0], "y": ["a"]}),
              pl.DataFrame({"id": [5], "x": [None]}, schema={"id": pl.Int64, "x": pl.Null}),
              pl.DataFrame({"id": [6], "x": [6.0]})]
    results = _send_together(batcher, frames)
    assert isinstance(results[1], InputError) and "row 1: column x is negative" in str(results[1])
    for i in (0, 2, 3, 5):
        assert isinstance(results[i], pl.DataFrame), results[i]
        assert results[i]["price"].to_list() == [2 * frames[i]["x"][0]]
    assert isinstance(results[4], pl.DataFrame) and results[4]["price"].to_list() == [None]
    for call in predictor.calls:  # never two requests with id 1, nor the 3-column one with others, in one call
        assert call.count(1) <= 1 and (4 not in call or call == [4])


def test_a_closed_batcher_ends_its_worker_and_still_answers() -> None:
    batcher = Batcher(_Slow(), "id")  # type: ignore[arg-type]
    batcher.close()
    batcher._worker.join(timeout=5)
    assert not batcher._worker.is_alive()
    out = batcher.predict(pl.DataFrame({"id": [7], "x": [1.0]}))
    assert out["price"].to_list() == [2.0]


@pytest.mark.parametrize("ids", [[[1, 2]], [[{"a": 1}]]])
def test_requests_without_usable_ids_are_priced_alone(ids: list) -> None:
    predictor = _Slow()
    batcher = Batcher(predictor, "id")  # type: ignore[arg-type]
    frame = pl.DataFrame({"id": ids, "x": [1.0]})
    results = _send_together(batcher, [frame, frame.clone()])
    assert len(predictor.calls) == 2 and all(isinstance(r, pl.DataFrame) and r.height == 1 for r in results)


def _clients(batcher: Batcher, clients: int, rounds: int, stagger_s: float) -> None:
    """Closed-loop clients: each sends its next request `stagger_s` x its number after its last answer."""
    def client(i: int) -> None:
        for r in range(rounds):
            time.sleep(stagger_s * i)
            out = batcher.predict(pl.DataFrame({"id": [1000 * i + r], "x": [float(i)]}))
            assert out["price"].to_list() == [2.0 * i]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("gather_ms", [0.0, 20.0])
def test_clients_coming_back_a_few_ms_apart_are_gathered_into_one_batch(gather_ms: float) -> None:
    """Four clients, each back 2 ms after the one before: with the gather window every round after the first is
    one call of four; without it (the control) the first one back is priced alone and the rounds split."""
    predictor = _Slow()
    batcher = Batcher(predictor, "id", gather_ms=gather_ms)  # type: ignore[arg-type]
    _clients(batcher, 4, 6, 0.002)
    full = sum(len(call) == 4 for call in predictor.calls)
    if gather_ms:
        assert full >= 5, predictor.calls
        assert len(predictor.calls) <= 8, predictor.calls
    else:
        assert full <= 1, predictor.calls
