"""Post-training (nested) and test-time training as library calls."""

import re

import pytest
import torch

from refine.algorithm.update import LossResult, fused_refine_step
from refine.algorithm.rollout import snapshot_rollouts
from refine.algorithm.update import score_rollouts
from refine.config import OptimConfig, RefineConfig, RunConfig
from refine.generate import generate
from refine.data.batches import DocumentBatch, pad_documents
from refine.models import build_model
from refine.phases import (
    QAExample, adapt_and_answer, answer_loss, answer_sft_loss, posttrain_step,
)
from refine.step import make_optimizer, optimizer_step, rollout_batch_update, train_step

CFG = RefineConfig(num_chunks=2, rollout_len=3, margin=4, reward="hybrid")


def _run_config(optim: OptimConfig, **train) -> RunConfig:
    return RunConfig(refine=CFG.model_dump(), optim=optim.model_dump(), train={"batch_size": 2, **train})


def _model():
    torch.manual_seed(0)
    return build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=30,
                            intermediate_size=32), dtype=torch.float64)


def _qa_examples():
    """Prompts (context then question) of 42 and 34 tokens, answers of 3 and 1."""
    gen = torch.Generator().manual_seed(0)
    return [QAExample(prompt=torch.randint(0, 30, (40,), generator=gen).tolist() + [1, 2], answer=[3, 4, 5]),
            QAExample(prompt=torch.randint(0, 30, (33,), generator=gen).tolist() + [6], answer=[7])]


def _padded(sequences):
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)] = torch.tensor(seq)
    return ids


def test_posttrain_step_is_a_refine_step_on_prompts_then_an_sft_step_at_the_updated_weights():
    examples, optim = _qa_examples(), OptimConfig(lr=1e-2)
    model = _model()
    optimizer = make_optimizer(model, optim)
    outcome = posttrain_step(model, optimizer, examples, _run_config(optim), sft_coef=0.5,
                             generator=torch.Generator().manual_seed(1))

    # The same two steps by hand: REFINE on the padded prompts alone, then SFT of the full sequences.
    expected = _model()
    by_hand = make_optimizer(expected, optim)
    refine_only, _ = fused_refine_step(expected, _padded([ex.prompt for ex in examples]), torch.tensor([42, 34]),
                                       CFG, torch.Generator().manual_seed(1))
    inner = optimizer_step(expected, by_hand, refine_only, optim.grad_clip)
    full = _padded([ex.prompt + ex.answer for ex in examples])
    sft = answer_loss(expected(full, output_state=False).logits, full, torch.tensor([42, 34]), torch.tensor([45, 35]))
    outer = optimizer_step(expected, by_hand, LossResult(0.5 * sft, sft, sft, {}), optim.grad_clip)

    assert not outcome.skipped and outcome.stats["loss"] == pytest.approx(refine_only.stats["loss"])
    assert outcome.stats["sft_loss"] == pytest.approx(float(sft.detach()))  # the answer's loss after the REFINE step
    assert outcome.stats["sft_grad_norm"] == pytest.approx(outer.stats["grad_norm"])
    assert outcome.stats["grad_norm"] == pytest.approx(inner.stats["grad_norm"])
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    # Both steps moved the weights: the SFT loss at the start differs from the one after the REFINE step.
    assert float(answer_sft_loss(_model(), examples).loss.detach()) != pytest.approx(outcome.stats["sft_loss"])


def test_posttrain_step_without_sft_is_the_refine_step_alone():
    examples, optim = _qa_examples(), OptimConfig(lr=1e-2)
    model, expected = _model(), _model()
    optimizer, by_hand = make_optimizer(model, optim), make_optimizer(expected, optim)
    outcome = posttrain_step(model, optimizer, examples, _run_config(optim), sft_coef=0.0,
                             generator=torch.Generator().manual_seed(1))
    refine_only, _ = fused_refine_step(expected, _padded([ex.prompt for ex in examples]), torch.tensor([42, 34]),
                                       CFG, torch.Generator().manual_seed(1))
    optimizer_step(expected, by_hand, refine_only, optim.grad_clip)
    assert "sft_loss" not in outcome.stats
    for got, want in zip(model.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(got, want)


def test_post_trainings_inner_step_is_the_update_test_time_training_takes_on_the_prompt():
    """Nested post-training trains the inner loop that test-time training runs: REFINE on the whole prompt."""
    (example,), optim = _qa_examples()[:1], OptimConfig(lr=1e-2)
    trained, adapted = _model(), _model()
    posttrain_step(trained, make_optimizer(trained, optim), [example], _run_config(optim), sft_coef=0.0,
                   generator=torch.Generator().manual_seed(1))
    adapt_and_answer(adapted, example.prompt, CFG, optim, steps=1, max_new_tokens=1, restore=False,
                     generator=torch.Generator().manual_seed(1))
    for (name, got), want in zip(trained.state_dict().items(), adapted.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_onepass_posttrain_samples_once_then_steps_per_mini_batch_then_sfts_the_whole_batch():
    """The paper code's nested step with mini-batches: the batch's rollouts come from the weights before any
    update, each mini-batch of prompts takes an optimizer step on them, and the SFT step follows."""
    examples, optim = _qa_examples(), OptimConfig(lr=1e-2)
    config = _run_config(optim, mode="onepass", mini_batches=2)
    model = _model()
    optimizer = make_optimizer(model, optim)
    outcome = posttrain_step(model, optimizer, examples, config, sft_coef=0.5,
                             generator=torch.Generator().manual_seed(1))

    expected = _model()
    by_hand = make_optimizer(expected, optim)
    prompts, lengths = _padded([ex.prompt for ex in examples]), torch.tensor([42, 34])
    rollouts = snapshot_rollouts(expected, prompts, lengths, CFG, torch.Generator().manual_seed(1))
    rollouts.rewards = score_rollouts(rollouts, CFG)
    inner = rollout_batch_update("onepass", expected, by_hand, prompts, lengths, rollouts, config)
    full = _padded([ex.prompt + ex.answer for ex in examples])
    sft = answer_loss(expected(full, output_state=False).logits, full, torch.tensor([42, 34]), torch.tensor([45, 35]))
    optimizer_step(expected, by_hand, LossResult(0.5 * sft, sft, sft, {}), optim.grad_clip)

    assert outcome.stats["loss"] == pytest.approx(inner.stats["loss"])
    assert outcome.stats["sft_loss"] == pytest.approx(float(sft.detach()))
    assert {float(state["step"]) for state in optimizer.state.values()} == {3.0}  # 2 REFINE + 1 SFT
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)


def test_answer_loss_counts_only_answer_tokens():
    logits = torch.zeros(1, 5, 4)
    logits[0, 2, 3] = 10.0  # predicts token 3 at index 3 confidently
    ids = torch.tensor([[0, 1, 2, 3, 0]])
    loss = answer_loss(logits, ids, torch.tensor([3]), torch.tensor([4]))
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([3]))
    torch.testing.assert_close(loss, expected)


def test_answer_loss_keeps_float64_logits_in_float64_and_lifts_bfloat16_to_float32():
    logits = torch.randn(2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[0, 1, 2, 3, 4, 1], [4, 3, 2, 1, 0, 0]])
    loss = answer_loss(logits, ids, torch.tensor([2, 4]), torch.tensor([6, 5]))
    # Answer tokens: ids[0, 2:6] (predicted at 1..4) and ids[1, 4:5] (predicted at 3), all weighted alike.
    expected = torch.nn.functional.cross_entropy(torch.cat([logits[0, 1:5], logits[1, 3:4]]),
                                                 torch.cat([ids[0, 2:6], ids[1, 4:5]]))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=0)
    assert answer_loss(logits.bfloat16(), ids, torch.tensor([2, 4]), torch.tensor([6, 5])).dtype == torch.float32


def test_test_time_training_restores_weights_and_accumulates_on_request():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, 30, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    optim = OptimConfig(lr=1e-2)
    answer, history = adapt_and_answer(model, prompt, CFG, optim, steps=2, max_new_tokens=4)
    assert len(history) == 2 and len(answer) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restored bit for bit
    assert all(p.grad is None for p in model.parameters())  # no gradients of the adaptation kept alive
    adapted_answer, _ = adapt_and_answer(model, prompt, CFG, optim, steps=2, max_new_tokens=4, restore=False)
    changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert changed, "with restore=False the adapted weights are kept"


def test_accumulating_with_one_optimizer_continues_the_adaptation():
    """Two calls of 2 steps sharing weights and an optimizer are one adaptation of 4 steps."""
    prompt = torch.randint(0, 30, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    optim = OptimConfig(lr=1e-2)
    longer = _model()
    _, longer_history = adapt_and_answer(longer, prompt, CFG, optim, steps=4, max_new_tokens=2, restore=False,
                                         generator=torch.Generator().manual_seed(0))
    for shared in (True, False):
        model, generator = _model(), torch.Generator().manual_seed(0)
        optimizer = make_optimizer(model, optim) if shared else None
        history = []
        for _ in range(2):
            history += adapt_and_answer(model, prompt, CFG, optim, steps=2, max_new_tokens=2, restore=False,
                                        generator=generator, optimizer=optimizer)[1]
        same = all(torch.equal(v, longer.state_dict()[k]) for k, v in model.state_dict().items())
        assert same == shared and (history == longer_history) == shared  # a fresh optimizer restarts AdamW
        if shared:
            assert {int(state["step"]) for state in optimizer.state.values()} == {4}


def test_vocab_limit_picks_the_best_id_below_it():
    model = _model()
    prompt = torch.randint(0, 30, (1, 10), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 6)[0]
    assert free[0] >= 5 and max(free[1:]) >= 5  # unlimited, it picks ids past the limit, first token included
    out = generate(model, prompt, 6, vocab_limit=5)[0]
    seq = prompt[0].tolist()
    for token in out:
        logits = model(torch.tensor([seq]), output_state=False).logits[0, -1]
        assert token == int(logits[:5].argmax())
        seq.append(token)
    assert generate(model, prompt, 6, vocab_limit=30) == generate(model, prompt, 6)
    with pytest.raises(ValueError, match="vocab_limit must be >= 1, got 0"):
        generate(model, prompt, 3, vocab_limit=0)


def test_greedy_generation_follows_argmax_of_full_forward():
    model = _model()
    prompt = torch.randint(0, 30, (1, 10), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, 5)[0]
    seq = prompt[0].tolist()
    for token in out:
        logits = model(torch.tensor([seq]), output_state=False).logits[0, -1]
        assert token == int(logits.argmax())
        seq.append(token)


BATCH_MODELS = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=30,
                      intermediate_size=32, use_short_conv=True),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2,
                           vocab_size=30, intermediate_size=32),
    "lact": dict(model_type="lact_swiglu", vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attn_heads=4,
                 num_lact_heads=2, inter_multi=2, lact_chunk_size=16, window_size=8, intermediate_size=24),
}


@pytest.mark.parametrize("name", sorted(BATCH_MODELS))
def test_right_padded_prompts_generate_what_each_prompt_generates_alone(name):
    torch.manual_seed(0)
    model = build_model(BATCH_MODELS[name], dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    lengths = [37, 80, 5, 64]  # inside, at and across the kernels' 64-token chunks and LaCT's 16-token chunks
    prompts = [torch.randint(0, 30, (n,), generator=gen).tolist() for n in lengths]
    padded, padded_lengths = pad_documents(prompts, pad_id=7)  # a real token id: it must not leak into any answer
    together = generate(model, padded, 12, eos_id=3, lengths=padded_lengths)
    alone = [generate(model, torch.tensor([ids]), 12, eos_id=3)[0] for ids in prompts]
    assert together == alone
    assert len(set(map(tuple, alone))) == 4  # distinct answers: rows were not mixed up


def test_generate_refuses_lengths_outside_the_prompt_width():
    model = _model()
    with pytest.raises(ValueError, match=r"lengths must be 2 integers in \[1, 6\], got \[6, 7\]"):
        generate(model, torch.zeros(2, 6, dtype=torch.long), 3, lengths=torch.tensor([6, 7]))


def test_generation_reads_the_device_at_most_once_per_token(host_reads):
    """Tokens stay on the device: without eos the host reads nothing per token, with eos one flag."""
    model = _model()
    prompts = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(5))
    answers = generate(model, prompts, 12)
    unused = min(set(range(30)) - {token for answer in answers for token in answer})  # an eos never produced
    short, long = (host_reads(lambda n=n: generate(model, prompts, n))[0] for n in (3, 12))
    assert short == long
    short, long = (host_reads(lambda n=n: generate(model, prompts, n, eos_id=unused))[0] for n in (3, 12))
    assert long - short == 9


def test_each_row_stops_at_its_own_eos():
    model = _model()
    prompts = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(5))
    free = generate(model, prompts, 12)
    eos = free[0][4]
    assert len({full.index(eos) for full in free if eos in full}) > 1, "rows should end at different steps"
    stopped = generate(model, prompts, 12, eos_id=eos)
    for answer, full in zip(stopped, free):
        assert answer == (full[:full.index(eos)] if eos in full else full)


def test_restoring_weights_refuses_a_carried_optimizer():
    model = _model()
    with pytest.raises(ValueError, match="restored weights would not match its state"):
        adapt_and_answer(model, [1, 2, 3], CFG, OptimConfig(), steps=1, max_new_tokens=1,
                         optimizer=torch.optim.AdamW(model.parameters()))


def test_test_time_training_keeps_the_callers_gradients_when_it_restores():
    model = _model()
    model(torch.randint(0, 30, (1, 20)), output_state=False).logits.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    prompt = torch.randint(0, 30, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    adapt_and_answer(model, prompt, CFG, OptimConfig(lr=1e-2), steps=1, max_new_tokens=1)
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())


def test_test_time_training_refuses_what_it_cannot_adapt_on_before_any_step():
    model, optim = _model(), OptimConfig(lr=1e-2)
    prompt = torch.randint(0, 30, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    for kwargs, message in (
        (dict(prompt=[]), "prompt is empty"),
        (dict(steps=-1), "steps must be a whole number >= 0, got -1"),
        (dict(steps=1.5), "steps must be a whole number, got 1.5"),
        (dict(prompt=prompt[:-1] + [30]), r"prompt\[0, 47\]=30 is not a token id of the model \(vocab_size=30"),
        (dict(prompt=[0.5] * 48), "prompt must be an integer tensor, got dtype torch.float32"),
        (dict(cfg=CFG.model_copy(update={"kl_coef": 0.1})), "refine.kl_coef=0.1: adapt_and_answer has no reference"),
    ):
        arguments = dict(model=model, prompt=prompt, cfg=CFG, optim=optim, steps=1, max_new_tokens=1) | kwargs
        with pytest.raises(ValueError, match=message):
            adapt_and_answer(**arguments)
    with torch.no_grad(), pytest.raises(ValueError, match=r"gradients are off: torch.no_grad\(\)"):
        adapt_and_answer(model, prompt, CFG, optim, steps=1, max_new_tokens=1)
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        adapt_and_answer(frozen, prompt, CFG, optim, steps=1, max_new_tokens=1)
    assert len(adapt_and_answer(frozen, prompt, CFG, optim, steps=0, max_new_tokens=2)[0]) == 2  # answering only


def test_posttrain_step_refuses_examples_and_settings_it_cannot_train_before_any_weight_changes():
    optim = OptimConfig(lr=1e-2)
    examples = _qa_examples()
    for bad_examples, kwargs, message in (
        ([QAExample(ex.prompt, []) for ex in examples], {}, "every answer is empty: nothing to train on"),
        ([examples[0], QAExample(examples[1].prompt, [30])], {}, r"examples\[1\].answer holds 30, not a token id"),
        ([QAExample([1.5] * 40, [3])], {}, r"examples\[0\].prompt holds torch.float32 values"),
        ([QAExample([], [3])], {}, r"examples\[0\].prompt is empty"),
        # A tensor's ids were added to the answer's, not joined with them (the SFT sequence silently wrong).
        ([QAExample(torch.tensor(examples[0].prompt), torch.tensor([7]))], {},
         r"examples\[0\].prompt is a tensor: QAExample holds lists of token ids \(give prompt.tolist\(\)\)"),
        ([], {}, "examples is empty"),
        (examples, dict(sft_coef=-1.0), "sft_coef must be a number from 0 to 3.403e\\+38 .* got -1.0"),
        (examples, dict(sft_coef=float("nan")), "sft_coef must be a number from 0 .* got nan"),
        (examples, dict(config=RunConfig(refine=CFG.model_copy(update={"kl_coef": 0.1}).model_dump())),
         "refine.kl_coef=0.1: posttrain_step has no reference policy"),
    ):
        model = _model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = make_optimizer(model, optim)
        arguments = dict(config=_run_config(optim)) | kwargs
        with pytest.raises(ValueError, match=message):
            posttrain_step(model, optimizer, bad_examples, generator=torch.Generator().manual_seed(1), **arguments)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), message
        assert not optimizer.state, message  # no optimizer step was taken


@pytest.mark.parametrize("frozen", [False, True], ids=["no_grad", "frozen"])
def test_gradient_steps_where_gradients_are_off_are_refused_naming_why(frozen):
    """A raw autograd error ("element 0 of tensors does not require grad") from deep inside, in every mode."""
    optim, examples = OptimConfig(lr=1e-2), _qa_examples()
    model = _model().requires_grad_(not frozen)
    optimizer = make_optimizer(model, optim)
    why = "no parameter of the model requires grad" if frozen else "gradients are off: torch.no_grad()"
    with torch.set_grad_enabled(frozen), pytest.raises(ValueError, match=re.escape(f"posttrain_step takes gradient "
                                                                                    f"steps, but {why}")):
        posttrain_step(model, optimizer, examples, _run_config(optim), generator=torch.Generator().manual_seed(1))
    ids, lengths = pad_documents([ex.prompt for ex in examples], 0)
    with torch.set_grad_enabled(frozen), pytest.raises(ValueError, match=re.escape(f"train_step takes gradient "
                                                                                    f"steps, but {why}")):
        train_step(model, optimizer, DocumentBatch(ids, lengths, ["a", "b"]), _run_config(optim),
                   torch.Generator().manual_seed(1))


def test_posttrain_step_takes_empty_answers_it_does_not_train_on():
    """No SFT step (sft_coef 0) reads no answer; an SFT step trains on the answers there are."""
    optim, examples = OptimConfig(lr=1e-2), _qa_examples()
    for batch, sft_coef in (([QAExample(ex.prompt, []) for ex in examples], 0.0),
                            ([examples[0], QAExample(examples[1].prompt, [])], 0.5)):
        model = _model()
        outcome = posttrain_step(model, make_optimizer(model, optim), batch, _run_config(optim), sft_coef=sft_coef,
                                 generator=torch.Generator().manual_seed(1))
        assert ("sft_loss" in outcome.stats) == (sft_coef > 0)
        assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))


def test_test_time_training_adapts_a_model_with_frozen_parameters():
    """Frozen embeddings (a common choice for test-time training): the rest adapts."""
    model = _model()
    model.model.embeddings.requires_grad_(False)
    embeddings = model.model.embeddings.weight.clone()
    prompt = torch.randint(0, 30, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    answer, stats = adapt_and_answer(model, prompt, CFG, OptimConfig(lr=1e-2), steps=1, max_new_tokens=2,
                                     restore=False)
    assert len(answer) == 2 and len(stats) == 1
    assert torch.equal(model.model.embeddings.weight, embeddings)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))


def test_a_fused_train_step_refuses_mini_and_micro_batches_it_would_ignore():
    optim = OptimConfig(lr=1e-2)
    model = _model()
    ids, lengths = pad_documents([ex.prompt for ex in _qa_examples()])
    for train, message in ((dict(mini_batches=2), "train.mini_batches=2 needs train.mode 'onepass' or 'reference'"),
                           (dict(micro_batches=2), "train.micro_batches=2 needs train.mode 'onepass', 'reference'")):
        config = _run_config(optim, mode="fused", **train)
        with pytest.raises(ValueError, match=message):
            train_step(model, make_optimizer(model, optim), DocumentBatch(ids, lengths, ["a", "b"]), config,
                       torch.Generator())


def test_pad_documents_refuses_values_that_are_not_token_ids():
    with pytest.raises(ValueError, match=r"document 1 of the batch holds torch.float32 values, not token ids"):
        pad_documents([[1, 2, 3], [1.5, 2.0]])
    with pytest.raises(ValueError, match=r"document 0 of the batch holds torch.bool values"):
        pad_documents([[True, False]])
    ids, lengths = pad_documents([torch.tensor([4, 5]), (6,)])
    assert ids.tolist() == [[4, 5], [6, 0]] and lengths.tolist() == [2, 1]


def test_library_calls_name_an_argument_of_the_wrong_type():
    """A RunConfig where a RefineConfig is taken (and the reverse), a tensor prompt, a list of ids: raw
    AttributeErrors ('num_chunks', 'train', 'dim') or "Boolean value of Tensor ... is ambiguous" before."""
    model, optim = _model(), OptimConfig(lr=1e-2)
    ids, lengths = pad_documents([ex.prompt for ex in _qa_examples()], 0)
    with pytest.raises(ValueError, match="cfg must be a RefineConfig, got RunConfig"):
        fused_refine_step(model, ids, lengths, _run_config(optim))
    with pytest.raises(ValueError, match="config must be a RunConfig, got RefineConfig"):
        train_step(model, make_optimizer(model, optim), DocumentBatch(ids, lengths, ["a", "b"]), CFG,
                   torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="config must be a RunConfig, got RefineConfig"):
        posttrain_step(model, make_optimizer(model, optim), _qa_examples(), CFG)
    with pytest.raises(ValueError, match="cfg must be a RefineConfig, got RunConfig"):
        adapt_and_answer(model, _qa_examples()[0].prompt, _run_config(optim), optim, steps=1, max_new_tokens=1)
    with pytest.raises(ValueError, match=re.escape("prompt is a tensor: adapt_and_answer takes a list of token ids")):
        adapt_and_answer(model, torch.tensor(_qa_examples()[0].prompt), CFG, optim, steps=1, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[batch, time\], got list"):
        model([[1, 2, 3]])
