"""`evaluate` on a tiny model: answers in batches, sampled answers, test-time training on each prompt, carried
across prompts or in batches, prompts cut in the middle, and the test-time settings fitted to short prompts."""

import json
import re

import pytest
import torch
from eval_helpers import TOKENIZER

from refine.config import OptimConfig, RefineConfig, RunConfig
from refine.data.synthetic import NiahConfig, generate_niah
from refine.data.tasks import TaskExample
from refine.evaluation import answering
from refine.evaluation.answering import (
    answer_batches,
    evaluate,
    fit_refine_config,
    prompt_tokens,
    ttt_refine_config,
)
from refine.evaluation.task_scoring import answer_text
from refine.generate import generate
from refine.models import build_model, load_model
from refine.phases import adapt_and_answer
from refine.step import make_optimizer


# ---------------------------------------------------------------- answers and test-time training


@pytest.mark.parametrize("reward, problem", [("nope", "is not a registered reward"),
                                             ("qa_f1", "scores decoded text")])
def test_test_time_training_refuses_a_reward_it_cannot_score_before_answering(model_dir, reward, problem):
    """Test-time training scores its rollouts in-process from tokens and hidden states: an unknown or a text
    reward fails up front, naming refine.reward, instead of at the first example's first step."""
    model = load_model(model_dir)
    examples = generate_niah(NiahConfig(length=320, seed=3), TOKENIZER, 1)
    config = RunConfig(refine=RefineConfig(reward=reward))
    with pytest.raises(ValueError, match=f"refine.reward={reward!r} {problem}"):
        evaluate(model, TOKENIZER, examples, "niah", ttt=True, run_config=config, progress=False)


def test_test_time_training_refuses_a_kl_term_it_has_no_reference_for(model_dir):
    model = load_model(model_dir)
    examples = generate_niah(NiahConfig(length=320, seed=3), TOKENIZER, 1)
    with pytest.raises(ValueError, match="refine.kl_coef=0.1: test-time training has no reference policy"):
        evaluate(model, TOKENIZER, examples, "niah", ttt=True, run_config=RunConfig(refine=RefineConfig(kl_coef=0.1)),
                 progress=False)


def test_prompts_answered_in_batches_get_the_answers_they_get_alone(model_dir):
    model = load_model(model_dir, dtype=torch.float64)
    # Prompts of different lengths and answer budgets, longest first: batches reorder them.
    examples = (generate_niah(NiahConfig(length=600, variant="multivalue", seed=2), TOKENIZER, 2)
                + generate_niah(NiahConfig(length=320, seed=2), TOKENIZER, 3))
    alone, together = (evaluate(model, TOKENIZER, examples, "niah", progress=False, batch_size=size)["examples"]
                       for size in (1, 3))
    assert [record["id"] for record in together] == [example.example_id for example in examples]
    assert together == alone
    assert len({record["prompt_tokens"] for record in together}) > 1
    assert all(record["generated_tokens"] > 0 for record in together)


@pytest.mark.parametrize("ttt", [False, True], ids=["plain", "ttt"])
def test_sampled_answers_follow_the_seed_and_top_1_sampling_is_greedy(model_dir, ttt):
    """eval.answer_temperature / answer_top_k reach the decoding of plain and test-time-trained answers alike."""
    model = load_model(model_dir, dtype=torch.float64)
    examples = generate_niah(NiahConfig(length=320, seed=2), TOKENIZER, 3)
    options = dict(progress=False, ttt=ttt, ttt_steps=1, max_new_tokens=12)

    def answers(**kwargs) -> list[str]:
        result = evaluate(model, TOKENIZER, examples, "niah", **options, **kwargs)
        return [record["prediction"] for record in result["examples"]]

    greedy = answers()
    sampled = answers(answer_temperature=1.0, seed=5)
    assert sampled == answers(answer_temperature=1.0, seed=5)  # seeded
    assert sampled != greedy and sampled != answers(answer_temperature=1.0, seed=6)
    assert answers(answer_temperature=1.0, answer_top_k=1, seed=5) == greedy  # the one most likely token
    summary = evaluate(model, TOKENIZER, examples[:1], "niah", **options, answer_temperature=0.5, answer_top_k=50,
                       seed=5)["summary"]
    assert summary["answer_decoding"] == {"temperature": 0.5, "top_k": 50, "seed": 5}


def test_ttt_accumulate_carries_weights_and_one_optimizer_across_examples(model_dir, monkeypatch):
    model = load_model(model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    examples = generate_niah(NiahConfig(length=320, seed=3), TOKENIZER, 2)
    config = RunConfig(optim=OptimConfig(lr=0.05))
    optimizers = []

    def counted_optimizer(*args):
        optimizers.append(make_optimizer(*args))
        return optimizers[-1]

    monkeypatch.setattr(answering, "make_optimizer", counted_optimizer)
    run = dict(ttt=True, run_config=config, ttt_steps=2, max_new_tokens=4, progress=False)
    accumulated = evaluate(model, TOKENIZER, examples, "niah", ttt_accumulate=True, **run)
    assert len(optimizers) == 1  # made once: its state (step count, moments) runs on over both examples
    assert {int(state["step"]) for state in optimizers[0].state.values()} == {4}
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())  # as the other modes leave it
    assert accumulated["summary"]["ttt_config"]["accumulate"] is True

    # The second example starts from the first's adapted weights and optimizer state.
    replay = load_model(model_dir)
    optimizer = make_optimizer(replay, config.optim)
    for index, (example, record) in enumerate(zip(examples, accumulated["examples"])):
        ids, _ = prompt_tokens(TOKENIZER, example.prompt, None)
        cfg, _ = fit_refine_config(ttt_refine_config(config.refine), len(ids))
        _, history = adapt_and_answer(replay, ids, cfg, config.optim, 2, 4, eos_id=TOKENIZER.eos_id, restore=False,
                                      generator=torch.Generator().manual_seed(index), optimizer=optimizer)
        assert history == record["ttt_history"]
    # Without accumulation each example starts from the original weights with a fresh optimizer.
    separate = evaluate(model, TOKENIZER, examples, "niah", **run)
    assert separate["examples"][0]["ttt_history"] == accumulated["examples"][0]["ttt_history"]
    assert separate["examples"][1]["ttt_history"] != accumulated["examples"][1]["ttt_history"]
    assert len(optimizers) == 1 and separate["summary"]["ttt_config"]["accumulate"] is False


# Per prompt: 2 examples x 2 steps; 2 batches of 1 prompt, 1 update each; 1 batch of 2 prompts, 2 updates (counted
# once as a batch before).
@pytest.mark.parametrize("ttt_batch, mini_batches, skipped", [(None, 1, 4), (1, 1, 2), (2, 2, 2)])
def test_ttt_updates_skipped_as_not_finite_are_counted_and_the_results_stay_json(ttt_batch, mini_batches, skipped):
    """A model whose logits are finite but whose gradient is not (its output layer scaled by 1e20): every test-time
    update is skipped. The results hold no Infinity (which strict JSON readers refuse), each skipped update is
    marked in its example's history, and the summary counts them."""
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=TOKENIZER.vocab_size, intermediate_size=64, tie_word_embeddings=False,
                             bos_token_id=257, eos_token_id=258, pad_token_id=256))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e20)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    examples = [TaskExample(example_id=str(i), task="ruler_qa", prompt="The capital of Norway is Oslo. " * 6,
                            answers=["Oslo"], max_new_tokens=2) for i in range(2)]
    results = evaluate(model, TOKENIZER, examples, "ruler-qa", ttt=True, ttt_steps=2, ttt_batch=ttt_batch,
                       run_config=RunConfig(optim=OptimConfig(lr=1.0), train={"mini_batches": mini_batches}),
                       progress=False)
    json.dumps(results, allow_nan=False)
    histories = [record["ttt_history"] for record in results["examples"]]
    assert all(stats["skipped_nonfinite"] == 1.0 and "grad_norm" in stats["nonfinite_stats"]
               for history in histories for stats in history)
    assert results["summary"]["ttt_config"]["skipped_updates"] == skipped
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_ttt_batches_update_once_per_mini_batch_answer_after_the_batch_and_carry_over(model_dir, monkeypatch):
    """The paper's released schedule: per batch of prompts, rollouts sampled once, an update per mini-batch,
    then the batch's answers; weights and one optimizer carry over to the next batch."""
    model = load_model(model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    examples = generate_niah(NiahConfig(length=320, seed=3), TOKENIZER, 3)
    config = RunConfig(optim=OptimConfig(lr=0.05), train={"mini_batches": 2})
    optimizers = []

    def counted_optimizer(*args):
        optimizers.append(make_optimizer(*args))
        return optimizers[-1]

    monkeypatch.setattr(answering, "make_optimizer", counted_optimizer)
    run = dict(ttt=True, run_config=config, max_new_tokens=6, progress=False, seed=11)
    batched = evaluate(model, TOKENIZER, examples, "niah", ttt_batch=2, **run)
    # Batches [0, 1] and [2]: 2 updates, then 1 (one prompt makes one mini-batch), on one optimizer.
    assert len(optimizers) == 1 and {int(state["step"]) for state in optimizers[0].state.values()} == {3}
    assert [record["ttt_batch"] for record in batched["examples"]] == [0, 0, 1]
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    ttt_config = batched["summary"]["ttt_config"]
    assert (ttt_config["batch"], ttt_config["mini_batches"], ttt_config["accumulate"]) == (2, 2, True)

    # The first batch's answers come after both of its updates: replayed by hand on a copy of the model.
    replay = load_model(model_dir)
    prompts = [prompt_tokens(TOKENIZER, example.prompt, None)[0] for example in examples]
    ids, lengths = answering.pad_documents(prompts[:2])
    generator = torch.Generator().manual_seed(11)
    onepass = config.model_copy(update={"refine": ttt_refine_config(config.refine),
                                        "train": config.train.model_copy(update={"mode": "onepass"})})
    stats = answering.train_step(replay, make_optimizer(replay, config.optim),
                                 answering.DocumentBatch(ids, lengths, ["a", "b"]), onepass, generator).stats
    assert batched["examples"][0]["ttt_history"] == [stats | {"optimizer_steps": 2.0}]  # 2 mini-batches
    expected = generate(replay, ids, 6, eos_id=TOKENIZER.eos_id, lengths=lengths, generator=generator,
                        vocab_limit=TOKENIZER.vocab_size)
    assert [record["generated_tokens"] for record in batched["examples"][:2]] == [len(tokens) for tokens in expected]
    assert [record["prediction"] for record in batched["examples"][:2]] == [
        answer_text(TOKENIZER, tokens, "niah") for tokens in expected]
    assert expected != generate(load_model(model_dir), ids, 6, eos_id=TOKENIZER.eos_id, lengths=lengths,
                                vocab_limit=TOKENIZER.vocab_size)  # the updates changed the answers
    # The last batch starts from the first's weights: its prompt's NTP loss (before its update, rollouts aside)
    # differs from the one it has as the only batch.
    alone = evaluate(model, TOKENIZER, examples[2:], "niah", ttt_batch=2, **run)
    assert alone["examples"][0]["ttt_history"][0]["ntp_loss"] != batched["examples"][2]["ttt_history"][0]["ntp_loss"]


def test_ttt_batches_fit_settings_to_their_shortest_prompt_and_answer_unadaptable_ones_as_they_are(model_dir,
                                                                                                     capsys):
    model = load_model(model_dir)
    def example(name: str, prompt: str) -> TaskExample:
        return TaskExample(example_id=name, task="ruler_qa", prompt=prompt, answers=["Ada"])

    examples = [example("long", "The lighthouse keeper is Ada. " * 12 + "Keeper?"),
                example("short", "Keeper of the light?"),  # 21 tokens: settings fitted to it
                example("tiny", "Hi")]  # 3 tokens: no rollout fits
    result = evaluate(model, TOKENIZER, examples, "ruler_qa", ttt=True, ttt_batch=3, max_new_tokens=2,
                      progress=False)
    long, short, tiny = result["examples"]
    assert long["ttt_history"] == short["ttt_history"] != [] and tiny["ttt_history"] == []
    assert long["ttt_fitted"] == short["ttt_fitted"] and "ttt_fitted" not in tiny
    ttt_config = result["summary"]["ttt_config"]
    assert (ttt_config["fitted_prompts"], ttt_config["unadapted_prompts"]) == (2, 1)
    assert "prompt of 3 tokens is too short for a rollout" in capsys.readouterr().err


@pytest.mark.parametrize("ttt", [False, True], ids=["plain", "ttt"])
def test_a_model_with_a_padded_vocabulary_answers_with_ids_the_tokenizer_decodes(ttt):
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                             vocab_size=320, intermediate_size=64, bos_token_id=257, eos_token_id=258,
                             pad_token_id=256))  # vocabulary padded past the byte tokenizer's 260 ids
    examples = generate_niah(NiahConfig(length=320, seed=0), TOKENIZER, 3)
    prompts = [torch.tensor([prompt_tokens(TOKENIZER, example.prompt, None)[0]]) for example in examples]
    free = [generate(model, ids, 16, eos_id=TOKENIZER.eos_id)[0] for ids in prompts]
    assert any(token >= TOKENIZER.vocab_size for answer in free for token in answer)  # it would pick them
    results = evaluate(model, TOKENIZER, examples, "niah", ttt=ttt, ttt_steps=1, max_new_tokens=16, progress=False)
    assert all(record["generated_tokens"] > 0 for record in results["examples"])
    if not ttt:  # the answers are the best decodable ids
        limited = [generate(model, ids, 16, eos_id=TOKENIZER.eos_id, vocab_limit=TOKENIZER.vocab_size)[0]
                   for ids in prompts]
        assert [record["prediction"] for record in results["examples"]] == [TOKENIZER.decode(a) for a in limited]


@pytest.mark.parametrize("one_length", [False, True])
def test_answer_batches_cover_every_prompt_once_shortest_first(one_length):
    lengths = [5, 3, 3, 9, 3, 5, 4]
    batches = answer_batches(lengths, 2, one_length)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= 2 for batch in batches)
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat)
    mixed = [batch for batch in batches if len({lengths[i] for i in batch}) > 1]
    assert (mixed == []) == one_length  # on CUDA a batch is one length; on CPU lengths 3 and 4 share one

# ---------------------------------------------------------------- prompts, test-time settings


def test_long_prompts_are_cut_in_the_middle_keeping_start_and_question():
    prompt = "INSTRUCTION " + "filler " * 100 + "QUESTION?"
    ids, full = prompt_tokens(TOKENIZER, prompt, 40)
    assert full == len(prompt) + 1 and len(ids) == 40
    assert ids[0] == TOKENIZER.bos_id and TOKENIZER.decode(ids[1:13]) == "INSTRUCTION "
    assert TOKENIZER.decode(ids).endswith("QUESTION?")
    assert prompt_tokens(TOKENIZER, "short", 40) == ([TOKENIZER.bos_id] + TOKENIZER.encode("short"), 6)


def test_ttt_defaults_fill_only_unset_fields():
    assert ttt_refine_config(RefineConfig()).reward == "binary"
    assert ttt_refine_config(RefineConfig()).lambda_nsp == 0.4
    explicit = ttt_refine_config(RefineConfig(reward="hybrid", lambda_nsp=0.1))
    assert (explicit.reward, explicit.lambda_nsp) == ("hybrid", 0.1)


def test_short_prompts_get_fitted_refine_settings_that_run():
    cfg = RefineConfig(num_chunks=8, rollout_len=5, margin=20)
    assert fit_refine_config(cfg, 400) == (cfg, None)
    fitted, note = fit_refine_config(cfg, 24)
    assert fitted is not None and "24 tokens" in note and "margin=" in note
    assert fitted.margin < 20 and fitted.margin + max(fitted.margin, 5) <= 24 and fitted.num_chunks == 8
    torch.manual_seed(0)
    model = build_model(dict(model_type="delta_net", hidden_size=16, num_heads=2, num_hidden_layers=1,
                             vocab_size=32, intermediate_size=16))
    prompt = torch.randint(0, 32, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    answer, history = adapt_and_answer(model, prompt, ttt_refine_config(fitted), OptimConfig(), 1, 2)
    assert len(history) == 1 and len(answer) <= 2
    tiny, note = fit_refine_config(cfg, 5)
    assert tiny is None and "answered without adaptation" in note
    few_tokens, _ = fit_refine_config(RefineConfig(num_chunks=8, rollout_len=1, margin=0), 3)
    assert few_tokens.num_chunks == 3  # one position per token at most

# ---------------------------------------------------------------- bad settings


def test_evaluate_refuses_the_same_test_time_settings(model_dir):
    model = load_model(model_dir)
    examples = [TaskExample(example_id="q", task="niah", prompt="the cat sat on the mat " * 20, answers=["mat"])]
    config = RunConfig.model_validate({"train": {"mini_batches": 2}})
    with pytest.raises(ValueError, match="ttt_batch=1 is smaller than train.mini_batches=2"):
        evaluate(model, TOKENIZER, examples, "niah", ttt=True, run_config=config, ttt_batch=1, progress=False)
    with pytest.raises(ValueError, match=rf"ttt_steps must be in \[0, {answering.MAX_TTT_STEPS}\]"):
        evaluate(model, TOKENIZER, examples, "niah", ttt=True, ttt_steps=answering.MAX_TTT_STEPS + 1, progress=False)


@pytest.mark.parametrize("arguments, message", [
    (dict(tokenizer="/models/tok"), "tokenizer must be a tokenizer, got the path '/models/tok'"),
    (dict(examples="one"), "examples must be a sequence of TaskExample, got str"),
    (dict(seed=1.5), "seed must be a whole number, got 1.5"),
    (dict(batch_size=2.5), "batch_size must be a whole number, got 2.5"),
    (dict(ttt=True, ttt_steps=1.5), "ttt_steps must be a whole number, got 1.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number, got True"),
])
def test_evaluate_names_a_wrong_argument_before_any_work(model_dir, arguments, message):
    """Each gave a raw AttributeError or TypeError from deep inside, or (batch_size=2.5) was taken silently."""
    examples = [TaskExample(example_id="q", task="niah", prompt="the cat sat on the mat " * 20, answers=["mat"])]
    call = dict(tokenizer=TOKENIZER, examples=examples) | arguments
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(load_model(model_dir), call.pop("tokenizer"), call.pop("examples"), "niah", progress=False, **call)
    with pytest.raises(ValueError, match="examples must be a sequence of TaskExample, got TaskExample"):
        evaluate(load_model(model_dir), TOKENIZER, examples[0], "niah", progress=False)
