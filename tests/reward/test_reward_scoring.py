"""score_batch: a RolloutBatch in, a ScoredBatch with one reward per rollout out."""

import math

import pytest
import torch

from refine.algorithm.rewards import RewardInputs, cosine_reward, register_reward, unregister_reward
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import score_rollouts
from refine.config import RefineConfig, tiny_delta_net
from refine.models import build_model
from refine.tokenizer import ByteTokenizer
from reward.scoring import ScoringError, rewards_summary, score_batch
from rollout_workers.worker import to_message
from services.codec import decode as decode_message
from services.codec import encode
from services.messages import DocumentBatch, RolloutBatch, ScoredBatch

# Two rollouts (B = 1, c = 2, n = 1), k = 2, D = 2: the hand-made vectors of the reward-math tests.
ROLLOUT_HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [-2.0, 0.0]]])
TRUTH_HIDDEN = torch.tensor([[[5.0, 0.0], [1.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
COSINE = [(1 + 1 / math.sqrt(2)) / 2, 0.0]
ROLLOUT_TOKENS = torch.tensor([[4, 7], [1, 1]])
TRUTH_TOKENS = torch.tensor([[4, 8], [1, 1]])
BINARY = [0.5, 1.0]
WORDS = ["paris", "is", "the", "capital", "london", "rome", "of", "france", "italy"]


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def batch(hidden: bool = True, truth: bool = True) -> RolloutBatch:
    return RolloutBatch(
        document_batch_id="doc-1",
        policy_version=3,
        worker_id="rollout-0",
        num_samples=1,
        rollout_len=2,
        positions=torch.tensor([[40, 90]]),
        entropies=torch.tensor([[1.5, 0.5]]),
        rollout_tokens=ROLLOUT_TOKENS,
        behaviour_logprobs=torch.full((2, 2), -0.5),
        rollout_hidden=ROLLOUT_HIDDEN if hidden else None,
        ground_truth_hidden=TRUTH_HIDDEN if hidden else None,
        ground_truth_tokens=TRUTH_TOKENS if truth else None,
    )


@pytest.mark.parametrize(
    "reward_type, expected",
    [("cosine", COSINE), ("binary", BINARY), ("hybrid", [c + b for c, b in zip(COSINE, BINARY)])],
)
def test_self_supervised_rewards(reward_type, expected):
    source = batch()
    scored = score_batch(source, reward_type)
    assert isinstance(scored, ScoredBatch)
    assert scored.reward_type == reward_type
    assert scored.rewards.dtype == torch.float32
    assert scored.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    # Everything the learner needs travels on unchanged.
    assert scored.rollout_batch_id == source.rollout_batch_id
    assert scored.policy_version == 3
    assert torch.equal(scored.rollout_tokens, source.rollout_tokens)
    assert torch.equal(scored.behaviour_logprobs, source.behaviour_logprobs)


def test_random_batch_matches_the_reward_math(make_batch):
    source = make_batch(seed=5, docs=2, chunks=3, samples=2, k=4, dim=6)
    scored = score_batch(source, "cosine")
    assert scored.rewards.shape == (12,)
    expected = cosine_reward(source.rollout_hidden, source.ground_truth_hidden).float()
    torch.testing.assert_close(scored.rewards, expected)


def test_text_rewards_decode_rollouts_and_ground_truth():
    # Row 0: "london france" vs "london italy": F1 = 0.5, no substring; row 1: "is is" both times.
    scored = score_batch(batch(), "qa_f1", decode=decode)
    assert scored.rewards.tolist() == pytest.approx([0.5, 1.0])
    scored = score_batch(batch(), "substring_match", decode=decode)
    assert scored.rewards.tolist() == [0.0, 1.0]


def test_missing_fields_are_named():
    source = batch(hidden=False)
    with pytest.raises(ScoringError, match=r"rollout_hidden.*ground_truth_hidden") as info:
        score_batch(source, "cosine")
    assert source.rollout_batch_id in str(info.value)
    with pytest.raises(ScoringError, match="ground_truth_tokens"):
        score_batch(batch(truth=False), "binary")
    with pytest.raises(ScoringError, match=r"rollout_texts.*decode"):
        score_batch(batch(), "qa_f1")
    with pytest.raises(ScoringError, match="reference_texts"):
        score_batch(batch(truth=False), "qa_f1", decode=decode)


def test_unknown_reward_and_wrong_input():
    with pytest.raises(ScoringError, match=r"unknown reward_type 'nope'.*cosine"):
        score_batch(batch(), "nope")
    with pytest.raises(ScoringError, match="RolloutBatch"):
        score_batch({"rollout_tokens": [[1]]}, "binary")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reward", ["cosine", "hybrid", "binary"])
def test_the_service_path_scores_as_the_loop_does_bit_for_bit(dtype, reward):
    """Rollout worker message -> wire -> score_batch -> wire gives the rewards `score_rollouts` gives in
    process, dtype included: a float64 run (the paths' correctness oracle) keeps float64 rewards."""
    torch.manual_seed(0)
    model = build_model(tiny_delta_net(), dtype=dtype).eval()
    ids = torch.randint(0, 256, (2, 128))
    lengths = torch.tensor([128, 100])
    cfg = RefineConfig(reward=reward, num_samples=2, num_chunks=2)
    rollouts = snapshot_rollouts(model, ids, lengths, cfg, torch.Generator().manual_seed(1))
    in_process = score_rollouts(rollouts, cfg)
    message = decode_message(encode(to_message(DocumentBatch(doc_ids=["a", "b"], token_ids=ids, lengths=lengths),
                                               rollouts, 0, "rollout-0")), RolloutBatch)
    served = decode_message(encode(score_batch(message, reward)), ScoredBatch).rewards
    assert served.dtype == in_process.dtype == (torch.float64 if dtype == torch.float64 and reward != "binary"
                                                else torch.float32)
    assert torch.equal(served, in_process)


def test_rewards_that_read_no_text_never_decode():
    """cosine_similarity (the paper's name for cosine) scores ids a tokenizer cannot decode."""
    source = batch().model_copy(update={"rollout_tokens": ROLLOUT_TOKENS + 10**6})
    scored = score_batch(source, "cosine_similarity", decode=ByteTokenizer().decode)
    assert scored.rewards.tolist() == pytest.approx(COSINE)


def test_text_rewards_score_ids_past_the_tokenizers_vocabulary():
    """A model's vocabulary may be larger than its tokenizer's: a sampled id that names no token is dropped from the
    text, not the end of the whole batch (a dead letter, which ends the run)."""
    tokenizer = ByteTokenizer()
    word = tokenizer.encode("x")
    source = batch().model_copy(update={"rollout_tokens": torch.tensor([[*word, tokenizer.vocab_size + 7]] * 2),
                                        "ground_truth_tokens": torch.tensor([[*word, 32]] * 2)})
    scored = score_batch(source, "qa_f1", decode=tokenizer.decode)
    assert scored.rewards.tolist() == [1.0, 1.0]


def test_a_blank_gold_answer_matches_nothing():
    """Ground-truth tokens that decode to blank text (a document's blank lines) would make every rollout contain
    the gold answer: such a rollout scores 0, and the batch's other rollouts are scored as usual."""
    blank = {8: " ", 1: ""}  # the row-1 truth ids [1, 1] decode to "", and so does its rollout; row 0 keeps words
    for reward, row_0 in (("substring_match", 1.0), ("qa_f1", 2 / 3)):  # "london france" against "london"
        scored = score_batch(batch(), reward, decode=lambda ids: " ".join(blank.get(i, WORDS[i]) for i in ids).strip())
        assert scored.rewards.tolist() == pytest.approx([row_0, 0.0])


def test_a_reward_output_the_scored_batch_refuses_is_a_scoring_error():
    register_reward("test_complex")(lambda inputs: torch.zeros(inputs.num_rollouts, dtype=torch.complex64))
    try:
        refused = r"cannot score rollout batch .*: reward 'test_complex' must return real scores, got dtype torch.complex64"
        with pytest.raises(ScoringError, match=refused):
            score_batch(batch(), "test_complex")
    finally:
        unregister_reward("test_complex")


def test_a_text_reward_registered_without_reads_text_is_told_so():
    def texts_length(inputs: RewardInputs) -> torch.Tensor:
        inputs.require("rollout_texts")
        return torch.tensor([float(len(text)) for text in inputs.rollout_texts])

    register_reward("test_undeclared_text")(texts_length)
    try:
        with pytest.raises(ScoringError, match=r"register_reward\(name, reads_text=True\)"):
            score_batch(batch(), "test_undeclared_text", decode=decode)
    finally:
        unregister_reward("test_undeclared_text")


def test_reward_summary_is_the_mean_and_population_std() -> None:
    """Without this, the reward replica's refine_reward_std gauge could switch to the Bessel-corrected std
    (0.7071 here, NaN for one rollout) and disagree with the learner's reward_std stat, which is the
    population std (refine.algorithm.update)."""
    assert rewards_summary(torch.tensor([0.0, 1.0])) == pytest.approx((0.5, 0.5))
    assert rewards_summary(torch.tensor([2.0])) == (2.0, 0.0)
    assert rewards_summary(torch.tensor([])) == (0.0, 0.0)
