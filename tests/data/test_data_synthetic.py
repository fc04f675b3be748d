import re

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from refine.data.documents import iter_documents
from refine.data.sources import DataConfig
from refine.data.synthetic import (
    MqarConfig,
    NiahConfig,
    RecallCorpusConfig,
    generate_mqar,
    generate_niah,
    generate_recall_documents,
    generate_recall_examples,
    mqar_for_length,
    prose_sentence,
    write_documents_jsonl,
)
from refine.evaluation.metrics import niah_score
from refine.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()
NEEDLE = re.compile(r"One of the secret (\w+)s for (\S+) is (\S+)\.")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    import random

    rng = random.Random(0)
    corpus = [prose_sentence(rng) for _ in range(400)] + ["One of the secret numbers for x is 1234567."] * 20
    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    directory = tmp_path_factory.mktemp("bpe")
    rust.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory)


def sentence_tokens(tokenizer):
    """The most tokens one filler sentence takes: the granularity of fitting a length."""
    import random

    rng = random.Random(1)
    return max(len(tokenizer.encode(" " + prose_sentence(rng))) for _ in range(300))


def needles_of(text):
    return [(m.start(), m.group(2), m.group(3)) for m in NEEDLE.finditer(text)]


def queried_keys(example):
    return example.metadata["keys"]


@pytest.mark.parametrize("variant", ["single", "multikey", "multiquery", "multivalue"])
@pytest.mark.parametrize("haystack", ["essay", "noise", "needles"])
def test_niah_answers_are_recoverable_from_the_prompt(variant, haystack):
    config = NiahConfig(variant=variant, haystack=haystack, length=1200, depth=0.4, seed=3)
    for example in generate_niah(config, BYTES, 3):
        keys = queried_keys(example)
        expected = {"single": (1, 1), "multikey": (1, 1), "multiquery": (4, 4), "multivalue": (1, 4)}[variant]
        assert (len(keys), len(example.answers)) == expected
        # Reading the needles of the queried keys back from the prompt gives exactly the gold answers.
        recovered = [value for _, key, value in needles_of(example.context) if key in keys]
        assert sorted(recovered) == sorted(example.answers)
        assert all(key in example.question for key in keys)
        assert niah_score(" ".join(recovered), example.answers) == 1.0
        assert niah_score("", example.answers) == 0.0
        # The answer budget holds every value in a sentence that lists them (4 values of 7 digits did not fit
        # the default 32 tokens, capping a perfect answer at 75).
        *others, last = example.answers
        listed = " " + ", ".join(others) + (", and " if others else "") + last
        ideal = BYTES.decode(BYTES.encode(listed + ".")[: example.max_new_tokens])
        assert niah_score(ideal, example.answers) == 1.0 and example.max_new_tokens >= 32
        if variant == "multikey":  # distractors: other keys, other values
            assert len({key for _, key, _ in needles_of(example.context)}) >= 4


def test_a_needles_haystack_of_the_longest_length_repeats_look_alike_keys_never_the_examples_own():
    # Its 2,500 word-pair keys ran out ("cannot draw 1 distinct words") before the haystack filled 131072 tokens.
    config = NiahConfig(variant="multikey", haystack="needles", length=131072, seed=3, purpose="eval")
    [example] = generate_niah(config, BYTES, 1)
    assert len(BYTES.encode(example.prompt)) <= 131072
    needles = needles_of(example.context)
    assert len(needles) > 2300  # nearly as many as there are keys: the last ones are hard to draw new
    keys = queried_keys(example)
    assert sorted(value for _, key, value in needles if key in keys) == sorted(example.answers)
    assert sum(value in example.answers for _, _, value in needles) == len(example.answers)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_needle_sits_at_the_asked_depth(depth):
    config = NiahConfig(variant="multikey", length=3000, depth=depth, seed=11)
    for example in generate_niah(config, BYTES, 2):
        context = example.context.encode("utf-8")  # byte tokenizer: tokens are bytes
        keys = queried_keys(example)
        spans = [(m.start(), m.end()) for m in NEEDLE.finditer(example.context) if m.group(2) in keys]
        block = spans[-1][1] - spans[0][0]
        rest = len(context) - block
        measured = spans[0][0] / rest
        # One filler sentence is the placement granularity.
        assert abs(measured - depth) <= 80 / rest, (measured, depth)
        assert abs(example.metadata["depth_actual"] - measured) < 0.01


def test_niah_length_is_filled_without_exceeding_it(bpe_tokenizer):
    for tokenizer in (BYTES, bpe_tokenizer):
        for length in (600, 2000):
            config = NiahConfig(variant="multivalue", length=length, depth=0.5)
            for example in generate_niah(config, tokenizer, 2):
                tokens = len(tokenizer.encode(example.prompt))
                assert tokens == example.metadata["num_tokens"]
                assert length - sentence_tokens(tokenizer) <= tokens <= length, (length, tokens)
    with pytest.raises(ValueError, match="too short"):
        generate_niah(NiahConfig(variant="multivalue", length=64), BYTES, 1)


def test_niah_is_deterministic_by_seed_and_independent_of_count():
    config = NiahConfig(variant="multiquery", length=800, seed=5)
    first = generate_niah(config, BYTES, 3)
    assert first == generate_niah(config, BYTES, 3)
    assert first[:2] == generate_niah(config, BYTES, 2)
    other = generate_niah(config.model_copy(update={"seed": 6}), BYTES, 3)
    assert [e.prompt for e in other] != [e.prompt for e in first]
    assert len({e.prompt for e in first}) == 3


def test_niah_random_depths_when_none_and_value_types():
    config = NiahConfig(variant="multiquery", length=2000, depth=None, key_type="uuids", value_type="words", seed=2)
    example = generate_niah(config, BYTES, 1)[0]
    positions = [start for start, key, _ in needles_of(example.context) if key in queried_keys(example)]
    assert len(positions) == 4 and positions == sorted(positions)
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", a) for a in example.answers)
    assert all(re.fullmatch(r"[0-9a-f-]{36}", k) for k in queried_keys(example))
    with pytest.raises(ValidationError, match="num_queries"):
        NiahConfig(variant="multiquery", num_keys=2)
    with pytest.raises(ValidationError, match="depth"):
        NiahConfig(depth=1.5)


def test_mqar_answers_follow_the_pairs():
    config = MqarConfig(num_pairs=20, num_queries=5, seed=9)
    examples = generate_mqar(config, 4)
    assert examples == generate_mqar(config, 4)
    assert examples[0].prompt != generate_mqar(config.model_copy(update={"seed": 10}), 1)[0].prompt
    for example in examples:
        pairs = dict(re.findall(r"([a-z]{3}):(\d{3})", example.prompt.split("\n")[1]))
        assert len(pairs) == 20  # keys are distinct
        queries = example.prompt.split("in order: ")[1].split("\n")[0].split()
        assert [pairs[q] for q in queries] == example.answers
        assert len(set(pairs.values())) == 20  # values too: no answer is right by chance


@pytest.mark.parametrize("length", [128, 1000])
def test_mqar_for_length_fits_every_example_a_subword_tokenizer_splits_differently(bpe_tokenizer, length):
    # Random keys and values take more or fewer subword tokens: one count for every example overflowed some.
    examples = mqar_for_length(length, bpe_tokenizer, 12, seed=1234, purpose="eval")
    sizes = [len(bpe_tokenizer.encode(example.prompt)) for example in examples]
    assert max(sizes) <= length
    assert examples == mqar_for_length(length, bpe_tokenizer, 12, seed=1234, purpose="eval")
    assert examples[3] == mqar_for_length(length, bpe_tokenizer, 4, seed=1234, purpose="eval")[3]  # per index
    counts = [len(re.findall(r"[a-z]{3}:\d+", example.prompt.split("\n")[1])) for example in examples]
    assert len(set(counts)) > 1  # the examples were fitted one by one


def test_mqar_prompts_fill_the_requested_length():
    for length in (128, 400):
        examples = mqar_for_length(length, ByteTokenizer(), 2, seed=0)
        sizes = [len(ByteTokenizer().encode(example.prompt)) for example in examples]
        assert all(length - 16 < size <= length for size in sizes), sizes


def test_recall_documents_state_facts_early_and_restate_them_later(bpe_tokenizer):
    config = RecallCorpusConfig(length=1500, num_facts=5, seed=4)
    for tokenizer in (BYTES, bpe_tokenizer):
        documents = generate_recall_documents(config, tokenizer, 3)
        assert documents == generate_recall_documents(config, tokenizer, 3)
        for document in documents:
            assert 1500 - sentence_tokens(tokenizer) <= len(tokenizer.encode(document.text)) <= 1500
            assert len({fact.subject for fact in document.facts}) == 5
            for fact in document.facts:
                statement = f"{fact.subject[0].upper()}{fact.subject[1:]} {fact.value}."
                assert document.text[fact.statement_offset:].startswith(statement)
                assert fact.statement_offset < 0.3 * len(document.text)
                assert fact.recall_offset > fact.statement_offset
                assert document.text[fact.recall_value_offset:].startswith(fact.value + ".")


def test_recall_examples_end_before_a_value_stated_earlier(tmp_path):
    config = RecallCorpusConfig(length=1000, num_facts=4, seed=1)
    examples = generate_recall_examples(config, BYTES, 4)
    for example in examples:
        assert example.task == "fact_recall" and len(example.answers) == 1
        value = example.answers[0]
        subject = example.metadata["subject"]
        assert example.prompt.endswith(subject)
        assert f"{subject[1:]} {value}." in example.prompt  # the fact was stated earlier in the prompt
    written = write_documents_jsonl(generate_recall_documents(config, BYTES, 3), tmp_path / "corpus.jsonl")
    documents = list(iter_documents(DataConfig(path=str(tmp_path / "corpus.jsonl"), show_progress=False), BYTES))
    assert written == len(documents) == 3
