"""The engine's batch: numpy views that llama.cpp reads as its own llama_batch fields."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from workers.engine.batch import Batch


def test_a_run_and_one_token_each_land_in_llama_cpps_fields():
    batch = Batch(16)
    try:
        n = batch.each(0, [7, 8], [40, 12], [3, 5])
        n = batch.run(n, [100, 101, 102], 20, 9, False)
        batch.logits[n - 1] = True
        batch.n_tokens = n
        raw = batch.raw
        assert raw.n_tokens == 5
        assert [raw.token[i] for i in range(5)] == [7, 8, 100, 101, 102]
        assert [raw.pos[i] for i in range(5)] == [40, 12, 20, 21, 22]
        assert [raw.seq_id[i][0] for i in range(5)] == [3, 5, 9, 9, 9]
        assert [raw.n_seq_id[i] for i in range(5)] == [1] * 5
        assert [raw.logits[i] for i in range(5)] == [1, 1, 0, 0, 1]
    finally:
        batch.free()  # llama.cpp frees its own per-position arrays: no crash, no leak


def test_positions_past_the_batch_are_refused_before_llama_cpp_sees_them():
    batch = Batch(4)
    try:
        with pytest.raises(IndexError, match="outside n_batch 4"):
            batch.run(2, [1, 2, 3], 0, 0, True)
        with pytest.raises(IndexError):
            batch.n_tokens = 5
        assert batch.run(2, [1, 2], 0, 0, True) == 4
    finally:
        batch.free()
