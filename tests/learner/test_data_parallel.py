"""Data parallelism's arithmetic (learner/data_parallel.py): document slices covering the batch (the loss
weights whose gradients sum to the whole batch's are tests/algorithm/test_slices.py's). Two gloo ranks are in
test_data_parallel_ranks.py; the 2-rank service run in tests/integration/test_service_data_parallel.py."""

from __future__ import annotations

import pytest
import ray

from learner.data_parallel import cuda_ordinal, document_slice, free_address


def test_documents_are_split_into_contiguous_slices_covering_the_batch() -> None:
    for documents in range(0, 7):
        for ranks in range(2, 5):
            slices = [document_slice(documents, rank, ranks) for rank in range(ranks)]
            covered = [i for start, end in slices for i in range(start, end)]
            assert covered == list(range(documents)), (documents, ranks)


def test_the_rank_0_address_outside_ray_is_loopback(monkeypatch) -> None:
    # The host name's address is not what other nodes reach; outside Ray every rank is on this machine.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # an earlier test may have left Ray running
    host, _, port = free_address().rpartition(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536


def test_the_gpu_ray_assigned_is_numbered_within_the_visible_devices() -> None:
    assert cuda_ordinal("3", "3") == 0  # Ray's default: only the actor's GPU is visible, as cuda:0
    assert cuda_ordinal("5", "4,5") == 1
    assert cuda_ordinal("2", None) == 2  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
    with pytest.raises(ValueError, match="Ray assigned GPU '1', but CUDA_VISIBLE_DEVICES='0,2' hides it"):
        cuda_ordinal("1", "0,2")
