"""Message schemas: valid messages survive the wire, inconsistent ones fail naming the field."""

import msgpack
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.codec import CodecError, decode, encode
from services.messages import DataCursor, DocumentBatch, RolloutBatch, ScoredBatch

B, C, N_SAMPLES, K, D = 2, 3, 2, 5, 8
N = B * C * N_SAMPLES


def make_documents(**overrides) -> DocumentBatch:
    fields = dict(
        doc_ids=["doc-0", "doc-1"],
        token_ids=torch.randint(0, 1000, (B, 64)),
        lengths=torch.tensor([64, 40]),
        cursor=DataCursor(epoch=1, offset=10, source="shard-3"),
    )
    fields.update(overrides)
    return DocumentBatch(**fields)


def rollout_fields(**overrides) -> dict:
    fields = dict(
        document_batch_id="docs-1",
        policy_version=7,
        worker_id="worker-0",
        num_samples=N_SAMPLES,
        rollout_len=K,
        positions=torch.randint(20, 40, (B, C)),
        entropies=torch.rand(B, C),
        rollout_tokens=torch.randint(0, 1000, (N, K)),
        behaviour_logprobs=-torch.rand(N, K),
        rollout_hidden=torch.randn(N, K, D, dtype=torch.bfloat16),
        ground_truth_hidden=torch.randn(N, K, D, dtype=torch.bfloat16),
        ground_truth_tokens=torch.randint(0, 1000, (N, K)),
    )
    fields.update(overrides)
    return fields


def test_document_batch_round_trips_through_the_codec() -> None:
    batch = make_documents()
    decoded = decode(encode(batch), DocumentBatch)
    assert decoded.batch_id == batch.batch_id and decoded.doc_ids == batch.doc_ids
    assert torch.equal(decoded.token_ids, batch.token_ids) and torch.equal(decoded.lengths, batch.lengths)
    assert decoded.cursor == batch.cursor and decoded.created_at == batch.created_at
    assert decoded.batch_size == B


def test_every_message_gets_a_distinct_id() -> None:
    assert make_documents().batch_id != make_documents().batch_id
    assert RolloutBatch(**rollout_fields()).rollout_batch_id != RolloutBatch(**rollout_fields()).rollout_batch_id


def test_rollout_and_scored_batches_round_trip() -> None:
    rollouts = RolloutBatch(**rollout_fields())
    scored = ScoredBatch.from_rollouts(rollouts, torch.rand(N), "cosine")
    decoded = decode(encode(scored), ScoredBatch)
    assert decoded.rollout_batch_id == rollouts.rollout_batch_id and decoded.reward_type == "cosine"
    for name in ("positions", "entropies", "rollout_tokens", "behaviour_logprobs", "rollout_hidden",
                 "ground_truth_hidden", "ground_truth_tokens", "rewards"):
        assert torch.equal(getattr(decoded, name), getattr(scored, name)), name
    assert decoded.rollout_hidden.dtype == torch.bfloat16


def test_optional_hidden_states_may_be_absent() -> None:
    batch = RolloutBatch(**rollout_fields(rollout_hidden=None, ground_truth_hidden=None, ground_truth_tokens=None))
    decoded = decode(encode(batch), RolloutBatch)
    assert decoded.rollout_hidden is None and decoded.ground_truth_hidden is None


def test_rollout_layout_is_document_chunk_sample() -> None:
    batch = RolloutBatch(**rollout_fields())
    assert (batch.batch_size, batch.num_chunks, batch.num_rollouts) == (B, C, N)
    rows = [batch.rollout_index(b, j, s) for b in range(B) for j in range(C) for s in range(N_SAMPLES)]
    assert rows == list(range(N))


def test_numpy_inputs_become_tensors() -> None:
    batch = make_documents(token_ids=np.zeros((B, 8), dtype=np.int32), lengths=np.array([8, 3]))
    assert isinstance(batch.token_ids, torch.Tensor) and batch.token_ids.dtype == torch.int32


def test_json_dump_lists_tensors() -> None:
    batch = make_documents(token_ids=torch.tensor([[1, 2], [3, 4]]), lengths=torch.tensor([2, 1]))
    dumped = batch.model_dump(mode="json")
    assert dumped["token_ids"] == [[1, 2], [3, 4]] and dumped["lengths"] == [2, 1]
    assert DocumentBatch.model_json_schema()["properties"]["token_ids"]["type"] == "array"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"doc_ids": ["only-one"]}, r"doc_ids: 1 ids for token_ids of 2 rows"),
        ({"lengths": torch.tensor([64])}, r"lengths: shape \[1\], expected \[2\]"),
        ({"lengths": torch.tensor([65, 3])}, r"lengths: values must be in 1..64, got 3..65"),
        ({"lengths": torch.tensor([0, 3])}, r"lengths: values must be in 1..64"),
        ({"token_ids": torch.rand(B, 64)}, r"token_ids\n.*expected an integer tensor, got dtype torch.float32"),
        ({"token_ids": torch.zeros(B, 4, 2, dtype=torch.long)}, r"token_ids\n.*expected 2 dimensions"),
        ({"token_ids": torch.full((B, 64), -1)}, r"token_ids: negative token id -1"),
        ({"token_ids": [[1, 2]]}, r"token_ids\n.*expected a torch tensor, got list"),
        ({"token_ids": torch.ones(B, 64, dtype=torch.uint32)}, r"token_ids\n.*expected an integer tensor, got dtype torch.uint32"),
        ({"batch_id": "has space"}, r"batch_id"),
        ({"surprise": 1}, r"surprise"),
    ],
)
def test_invalid_document_batches_name_the_field(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValidationError, match=pattern):
        make_documents(**overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"rollout_tokens": torch.zeros(N + 1, K, dtype=torch.long)},
         r"rollout_tokens: shape \[13, 5\], expected \[12, 5\] \(B=2 x c=3 x n=2"),
        ({"rollout_len": 4}, r"rollout_tokens: shape \[12, 5\], expected \[12, 4\]"),
        ({"num_samples": 1}, r"rollout_tokens: shape \[12, 5\], expected \[6, 5\]"),
        ({"behaviour_logprobs": torch.zeros(N, K - 1)}, r"behaviour_logprobs: shape \[12, 4\], expected \[12, 5\]"),
        ({"entropies": torch.rand(B, C + 1)}, r"entropies: shape \[2, 4\], expected \[2, 3\]"),
        ({"rollout_hidden": torch.zeros(N, K + 1, D)}, r"rollout_hidden: shape \[12, 6, 8\], expected \[12, 5, D\]"),
        ({"ground_truth_hidden": torch.zeros(N, K, D + 1)}, r"disagree on the hidden size: \[8, 9\]"),
        ({"ground_truth_tokens": torch.zeros(N, 1, dtype=torch.long)}, r"ground_truth_tokens: shape \[12, 1\]"),
        ({"positions": torch.full((B, C), -3)}, r"positions: a rollout starts after at least one token .*got -3"),
        ({"positions": torch.zeros(B, C, dtype=torch.long)}, r"positions: .* got 0"),
        ({"positions": torch.zeros(B, C)}, r"positions\n.*expected an integer tensor"),
        ({"behaviour_logprobs": torch.zeros(N, K, dtype=torch.long)}, r"behaviour_logprobs\n.*floating-point"),
        ({"behaviour_logprobs": torch.full((N, K), 0.5)},
         r"behaviour_logprobs: a log-probability is finite and <= 0, got 0.5 at \[0, 0\]"),
        ({"behaviour_logprobs": torch.zeros(N, K).index_put_((torch.tensor(4), torch.tensor(1)),
                                                             torch.tensor(2.0**-20))},
         r"behaviour_logprobs: .* got 9.5367431640625e-07 at \[4, 1\]"),
        ({"behaviour_logprobs": torch.zeros(N, K).index_fill_(1, torch.tensor([3]), float("nan"))},
         r"behaviour_logprobs: .* got nan at \[0, 3\]"),
        ({"behaviour_logprobs": torch.zeros(N, K).index_fill_(0, torch.tensor([7]), -float("inf"))},
         r"behaviour_logprobs: .* got -inf at \[7, 0\]"),
        ({"ground_truth_tokens": torch.full((N, K), -2)}, r"ground_truth_tokens: negative token id -2"),
        ({"positions": torch.zeros(B, 0, dtype=torch.long), "entropies": torch.zeros(B, 0),
          "rollout_tokens": torch.zeros(0, K, dtype=torch.long), "behaviour_logprobs": torch.zeros(0, K),
          "rollout_hidden": None, "ground_truth_hidden": None, "ground_truth_tokens": None},
         r"positions: shape \[2, 0\], a rollout batch needs at least one document and one position each"),
        ({"positions": torch.zeros(0, C, dtype=torch.long), "entropies": torch.zeros(0, C),
          "rollout_tokens": torch.zeros(0, K, dtype=torch.long), "behaviour_logprobs": torch.zeros(0, K),
          "rollout_hidden": None, "ground_truth_hidden": None, "ground_truth_tokens": None},
         r"positions: shape \[0, 3\], a rollout batch needs"),
        ({"policy_version": -1}, r"policy_version"),
        ({"num_samples": 0}, r"num_samples"),
        ({"worker_id": ""}, r"worker_id"),
    ],
)
def test_inconsistent_rollout_batches_name_the_field(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValidationError, match=pattern):
        RolloutBatch(**rollout_fields(**overrides))


def test_log_probabilities_of_zero_are_accepted() -> None:
    """A token the policy was certain of has log-prob 0 (and -0.0 after a negation): still a log-probability."""
    batch = RolloutBatch(**rollout_fields(behaviour_logprobs=-torch.zeros(N, K)))
    assert float(batch.behaviour_logprobs.max()) == 0.0


def test_vocabulary_misfit_names_the_first_token_id_past_the_vocabulary() -> None:
    ids = torch.randint(0, 100, (B, 64))
    batch = make_documents(token_ids=ids)
    assert batch.vocabulary_misfit(100) is None
    ids[1, 9], ids[1, 20] = 100, 5000
    assert batch.vocabulary_misfit(100) == "token_ids[1, 9]=100 is not below model.vocab_size=100"
    assert batch.vocabulary_misfit(5001) is None


def test_scored_batch_needs_one_reward_per_rollout() -> None:
    rollouts = RolloutBatch(**rollout_fields())
    with pytest.raises(ValidationError, match=r"rewards: shape \[11\], expected \[12\]"):
        ScoredBatch.from_rollouts(rollouts, torch.rand(N - 1), "binary")
    with pytest.raises(ValidationError, match="reward_type"):
        ScoredBatch.from_rollouts(rollouts, torch.rand(N), "")
    with pytest.raises(ValidationError, match=r"rewards\n.*floating-point"):
        ScoredBatch.from_rollouts(rollouts, torch.ones(N, dtype=torch.long), "binary")


def test_a_payload_with_an_unusable_integer_dtype_is_a_codec_error() -> None:
    """uint32 token ids cross the wire (the codec carries the dtype) but are refused with the field named,
    as a CodecError a consumer dead-letters, not an exception from inside torch that would end it."""
    from services.codec import CodecError

    documents = make_documents()
    payload = encode(documents.model_copy(update={"token_ids": documents.token_ids.to(torch.uint32)}))
    with pytest.raises(CodecError, match="(?s)not a valid DocumentBatch.*token_ids.*torch.uint32"):
        decode(payload, DocumentBatch)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1.0, "5", True])
def test_created_at_is_a_finite_non_negative_number(value: object) -> None:
    with pytest.raises(ValidationError, match="created_at"):
        make_documents(created_at=value)
    # The same over the wire: the consumer gets a one-line CodecError naming the field and the value.
    message = msgpack.unpackb(encode(make_documents()), raw=False)
    message["body"]["created_at"] = value
    with pytest.raises(CodecError, match=rf"created_at: .* \(got {value!r}\)$"):
        decode(msgpack.packb(message, use_bin_type=True), DocumentBatch)
    assert make_documents(created_at=0).created_at == 0.0


@pytest.mark.parametrize(("field", "value"), [("policy_version", "7"), ("policy_version", True),
                                              ("policy_version", 7.0), ("num_samples", "2"), ("worker_id", 5)])
def test_a_value_of_another_type_is_refused_not_converted(field: str, value: object) -> None:
    """Every message comes from the run's own roles: a version sent as text or a flag is a bug to be named, not a
    value to be guessed (lax validation took "7" and True as 7 and 1)."""
    with pytest.raises(ValidationError, match=field):
        RolloutBatch(**rollout_fields(**{field: value}))
    message = msgpack.unpackb(encode(RolloutBatch(**rollout_fields())), raw=False)
    message["body"][field] = value
    with pytest.raises(CodecError, match=rf"{field}: .* \(got {value!r}\)$"):
        decode(msgpack.packb(message, use_bin_type=True), RolloutBatch)
