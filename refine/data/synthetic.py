"""Seeded synthetic long-context tasks, all returning `TaskExample`s scored by string match:

- `generate_niah`: needle in a haystack in RULER's spirit (single, multi-key, multi-query, multi-value),
  with the prompt's length in tokens of a given tokenizer and the needles' depth chosen;
- `generate_mqar`: multi-query associative recall (key-value pairs, then queries); `mqar_for_length`, which
  training and evaluation use, takes as many pairs as keep each prompt within a length in tokens;
- `generate_recall_documents` / `generate_recall_examples`: a procedural corpus whose documents state
  facts early and restate them later, so predicting the later text needs memory of the earlier text.

Example i depends only on (purpose, seed, i), never on how many examples are asked for. The purpose ("train",
"heldout", "eval") salts every random stream, so that held-out and evaluation sets never come from a stream the
training corpus drew from, whatever the two seeds: they share a question and answer with it only by the chance of
two unrelated draws (the training streams are those this module always drew, so training corpora are unchanged).
All text is generated here from small word lists; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from refine.data.tasks import DEFAULT_MAX_NEW_TOKENS, TaskExample
from refine.tokenizer import Tokenizer

_T = TypeVar("_T")

# ---------------------------------------------------------------- vocabulary

ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "brisk", "calm", "clever", "copper", "crimson", "curious", "distant",
    "dusty", "eager", "faint", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lonely",
    "lucky", "misty", "noble", "olive", "pale", "quiet", "rapid", "restless", "rusty", "sandy", "scarlet", "silent",
    "silver", "sleepy", "smooth", "solemn", "steady", "stormy", "sturdy", "sunny", "swift", "tender", "tidy",
    "velvet", "wandering", "wild", "wooden",
)
NOUNS = (
    "anchor", "badger", "banner", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cedar", "comet",
    "compass", "cottage", "falcon", "feather", "ferry", "fountain", "garden", "glacier", "harbor", "heron",
    "island", "kettle", "lantern", "ledger", "meadow", "mill", "mirror", "orchard", "otter", "parrot", "pebble",
    "pine", "quarry", "raven", "river", "saddle", "spindle", "sparrow", "summit", "teapot", "thistle", "tower",
    "trumpet", "valley", "violin", "walnut", "willow", "window", "wren",
)
FIRST_NAMES = (
    "Adela", "Boris", "Cato", "Dalia", "Edwin", "Farah", "Gideon", "Hana", "Ivo", "Jorun", "Kenji", "Lior",
    "Mirela", "Nadim", "Orsa", "Piet", "Quilla", "Rasmus", "Sela", "Tobin", "Una", "Viggo", "Wren", "Yara", "Zeno",
)
FAMILY_NAMES = (
    "Aldana", "Brask", "Corvin", "Dunmore", "Eskel", "Fenwick", "Galloway", "Holm", "Ibarra", "Jessup", "Kovac",
    "Lindqvist", "Marlow", "Novak", "Oakley", "Pryce", "Quinlan", "Rourke", "Sorensen", "Thorne",
)
PLACES = (
    "north gate", "old library", "river mill", "east tower", "salt market", "lower harbor", "glass workshop",
    "winter garden", "stone chapel", "south bridge", "copper mine", "town archive", "hill observatory",
    "weavers' hall", "lighthouse", "bell foundry",
)
CONTAINERS = ("chest", "cabinet", "crate", "jar", "vault", "trunk", "barrel", "casket")
COLORS = ("blue", "green", "red", "black", "white", "yellow", "grey", "violet")
GOODS = ("coins", "maps", "candles", "keys", "letters", "stones", "feathers", "buttons")

# Procedural prose for haystacks and fillers: subject + verb phrase + place + time.
_SUBJECTS = (
    "The fishermen", "An old carpenter", "The village children", "A travelling merchant", "The miller's daughter",
    "Most of the farmers", "A pair of herons", "The night watchman", "Several weavers", "The schoolteacher",
    "A young clerk", "The baker", "Two shepherds", "The ferryman", "A quiet stranger",
)
_VERB_PHRASES = (
    "mended their nets", "counted the sacks of grain", "walked along the shore", "sang an old song",
    "repaired the fence", "watched the clouds drift", "traded wool for salt", "swept the narrow lanes",
    "painted the shutters", "gathered firewood", "argued about the weather", "carried water from the well",
    "read letters aloud", "planted rows of beans", "polished the brass lamps",
)
_PLACE_PHRASES = (
    "near the harbor", "behind the chapel", "at the edge of the forest", "on the hill above the town",
    "beside the river", "in the crowded square", "under the old bridge", "outside the mill",
    "by the eastern wall", "in the walled garden",
)
_TIME_PHRASES = (
    "every morning", "before the first frost", "late in the evening", "on market days", "during the long rains",
    "as the sun went down", "while the bells rang", "most afternoons", "at the turn of the season",
    "when the tide was low",
)
# A fixed, repetitive haystack (RULER's "noise" kind): the same few sentences over and over.
_NOISE_SENTENCES = (
    "The tide comes in and the tide goes out.",
    "The lamps along the pier are lit at dusk.",
    "Gulls circle above the fishing boats.",
    "The wind turns the weathervane slowly.",
    "Then the harbor is quiet again.",
)


Purpose = Literal["train", "heldout", "eval"]


def stream_salt(kind: str, purpose: Purpose) -> str:
    """The salt of a generator's random streams, `Random(f"{salt}:{seed}:{index}")`: the generator's own name
    for training (the streams training corpora were always drawn from), `{purpose}/{kind}` otherwise. A salt
    holds no ':' and seeds are integers, so streams of different salts differ for every pair of seeds and
    indices; `random` seeds with the whole string (its bytes and their SHA-512), so different strings give
    different streams."""
    if purpose not in ("train", "heldout", "eval"):
        raise ValueError(f"purpose must be train, heldout or eval, got {purpose!r}")
    return kind if purpose == "train" else f"{purpose}/{kind}"


def _example_rng(seed: int, index: int, salt: str, purpose: Purpose = "train") -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and processes.
    return random.Random(f"{stream_salt(salt, purpose)}:{seed}:{index}")


def _set_name(seed: int, purpose: Purpose) -> str:
    """The seed part of example ids: the seed alone for training (the ids training documents always had), the
    purpose and seed otherwise, so that an evaluation example's id never names a training document."""
    return str(seed) if purpose == "train" else f"{purpose}_{seed}"


def prose_sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERB_PHRASES)} {rng.choice(_PLACE_PHRASES)} "
        f"{rng.choice(_TIME_PHRASES)}."
    )


def random_word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return random_word_pair(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle kind must be numbers, words or uuids, got {kind!r}")


def _distinct(kind: str, count: int, rng: random.Random, taken: set[str]) -> list[str]:
    """`count` new values, none in `taken` (which grows): a gold answer never appears twice by chance."""
    values: list[str] = []
    for _ in range(100 * count + 100):
        if len(values) == count:
            return values
        value = random_value(kind, rng)
        if value not in taken:
            taken.add(value)
            values.append(value)
    raise ValueError(f"cannot draw {count} distinct {kind}: too few possibilities")


# ---------------------------------------------------------------- fitting text to a token budget


@dataclass
class _Layout:
    """A prompt made of a prefix, items joined by a separator, and a suffix."""

    prefix: str
    items: list[str]
    separator: str
    suffix: str

    def render(self) -> tuple[str, list[int]]:
        """The text and the character offset of every item."""
        offsets: list[int] = []
        parts = [self.prefix]
        position = len(self.prefix)
        for number, item in enumerate(self.items):
            if number:
                parts.append(self.separator)
                position += len(self.separator)
            offsets.append(position)
            parts.append(item)
            position += len(item)
        parts.append(self.suffix)
        return "".join(parts), offsets


class LengthTooShortError(ValueError):
    """A length leaves no room for a text's fixed part (all but its filler); `needed` is the most tokens that
    part takes, over every example asked for, so that a caller can name the least length that works."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


def _every_example(make: Callable[[int], _T], count: int, length: int) -> list[_T]:
    """make(i) for i < count. When some examples do not fit `length`, one error for all of them, naming the
    most tokens any needs: stopping at the first would name a length that the next example refuses."""
    made: list[_T] = []
    needed = 0
    for index in range(count):
        try:
            made.append(make(index))
        except LengthTooShortError as error:
            needed = max(needed, error.needed)
    if needed:
        raise LengthTooShortError(
            f"length {length} tokens is too short: the prompt without filler already takes {needed}", needed)
    return made


def _largest_fitting(build: Callable[[int], str], tokenizer: Tokenizer, upper: int, length: int) -> int:
    """The largest n in [0, upper] with len(encode(build(n))) <= length (token counts grow with n)."""
    if len(tokenizer.encode(build(0))) > length:
        needed = len(tokenizer.encode(build(0)))
        raise LengthTooShortError(
            f"length {length} tokens is too short: the prompt without filler already takes {needed}", needed)
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.encode(build(middle))) <= length:
            low = middle
        else:
            high = middle - 1
    return low


def _filler(
    make_sentence: Callable[[], str], tokenizer: Tokenizer, budget: int, separator: str
) -> list[str]:
    """Enough filler sentences to pass `budget` tokens, with slack for tokenizers that merge across joins."""
    sentences: list[str] = []
    total = 0
    while total < budget * 1.15 + 16:
        batch = [make_sentence() for _ in range(64)]
        sentences.extend(batch)
        total += sum(len(ids) for ids in tokenizer.encode_batch([separator + s for s in batch]))
    return sentences


def _nearest_boundary(token_counts: Sequence[int], target: float) -> int:
    """The item boundary (0..len) whose preceding token count is closest to `target`."""
    best, best_gap, running = 0, abs(target), 0
    for boundary, count in enumerate(token_counts, start=1):
        running += count
        gap = abs(running - target)
        if gap < best_gap:
            best, best_gap = boundary, gap
    return best


# ---------------------------------------------------------------- needle in a haystack

NiahVariant = Literal["single", "multikey", "multiquery", "multivalue"]
NeedleKind = Literal["numbers", "words", "uuids"]
_KIND_NOUN = {"numbers": "number", "words": "word", "uuids": "code"}


class NiahConfig(BaseModel):
    """Needle-in-a-haystack settings. `length` is the prompt's size in tokens of the tokenizer passed to
    `generate_niah` (the prompt is as long as fits). `depth` in [0, 1] puts the queried needles after that
    share of the rest of the context (None: every needle at a random depth)."""

    model_config = ConfigDict(extra="forbid")

    variant: NiahVariant = "single"
    length: int = Field(1024, ge=32)
    depth: float | None = Field(None, ge=0.0, le=1.0)
    haystack: Literal["essay", "noise", "needles"] = "essay"
    key_type: NeedleKind = "words"
    value_type: NeedleKind = "numbers"
    num_keys: int | None = Field(None, ge=1)
    num_values: int | None = Field(None, ge=1)
    num_queries: int | None = Field(None, ge=1)
    seed: int = 0
    purpose: Purpose = Field("train", description="what the examples are for; it salts their random streams, so "
                             "heldout and eval sets never repeat training documents, whatever the seeds")

    @model_validator(mode="after")
    def _fill_variant_defaults(self) -> "NiahConfig":
        defaults = {"single": (1, 1, 1), "multikey": (4, 1, 1), "multiquery": (4, 1, 4), "multivalue": (1, 4, 1)}
        keys, values, queries = defaults[self.variant]
        self.num_keys = self.num_keys or keys
        self.num_values = self.num_values or values
        self.num_queries = self.num_queries or queries
        if self.num_queries > self.num_keys:
            raise ValueError(f"num_queries ({self.num_queries}) cannot exceed num_keys ({self.num_keys})")
        return self


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the secret {kind}s for {key} is {value}."


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def generate_niah(config: NiahConfig, tokenizer: Tokenizer, num_examples: int) -> list[TaskExample]:
    """Needle-in-a-haystack examples; answers are every value of every queried key (string_match_all)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return _every_example(lambda index: _niah_example(config, tokenizer, index), num_examples, config.length)


def _look_alike_needles(config: NiahConfig, kind: str, rng: random.Random, taken: set[str]) -> Callable[[], str]:
    """Haystack sentences that are needles of other keys and values, each new to the prompt while any are left
    (the 2,500 word-pair keys run out past about 100K tokens of haystack); then keys and values may repeat among
    them, never one of the example's own needles (those in `taken` now)."""
    reserved = frozenset(taken)
    exhausted = False

    def draw(value_kind: str) -> str:
        nonlocal exhausted
        if not exhausted:
            try:
                return _distinct(value_kind, 1, rng, taken)[0]
            except ValueError:
                exhausted = True
        return _distinct(value_kind, 1, rng, set(reserved))[0]

    return lambda: _needle(kind, draw(config.key_type), draw(config.value_type))


def _niah_example(config: NiahConfig, tokenizer: Tokenizer, index: int) -> TaskExample:
    rng = _example_rng(config.seed, index, "niah", config.purpose)
    kind = _KIND_NOUN[config.value_type]
    taken: set[str] = set()
    keys = _distinct(config.key_type, config.num_keys, rng, taken)
    values = [_distinct(config.value_type, config.num_values, rng, taken) for _ in keys]
    queried = sorted(rng.sample(range(len(keys)), config.num_queries))
    query_keys = [keys[k] for k in queried]
    answers = [value for k in queried for value in values[k]]
    queried_needles = [_needle(kind, keys[k], v) for k in queried for v in values[k]]
    rng.shuffle(queried_needles)
    distractors = [_needle(kind, keys[k], v) for k in range(len(keys)) if k not in queried for v in values[k]]

    separator = " " if config.haystack == "essay" else "\n"
    if config.haystack == "essay":
        make_sentence = lambda: prose_sentence(rng)  # noqa: E731
    elif config.haystack == "noise":
        cycle = iter(range(10**9))
        make_sentence = lambda: _NOISE_SENTENCES[next(cycle) % len(_NOISE_SENTENCES)]  # noqa: E731
    else:  # a haystack of look-alike needles with other keys and values
        make_sentence = _look_alike_needles(config, kind, rng, taken)

    plural = len(answers) > 1
    prefix = (
        f"Some secret {kind}s are hidden in the text below. Read it carefully: you will be asked for "
        f"{'them' if plural else 'one of them'} afterwards.\n\n"
    )
    query = _join_keys(query_keys)
    if plural:
        suffix = (
            f"\n\nQuestion: What are all the secret {kind}s for {query} in the text above?\n"
            f"Answer: The secret {kind}s for {query} are"
        )
    else:
        suffix = (
            f"\n\nQuestion: What is the secret {kind} for {query} in the text above?\n"
            f"Answer: The secret {kind} for {query} is"
        )

    budget = config.length - len(tokenizer.encode(prefix + suffix + " ".join(queried_needles + distractors)))
    filler = _filler(make_sentence, tokenizer, max(budget, 0), separator)
    filler_tokens = [len(ids) for ids in tokenizer.encode_batch([separator + s for s in filler])]
    # Distractor needles sit at random depths; positions are fractions so they scale with the filler kept.
    distractor_depths = [rng.random() for _ in distractors]
    random_depths = [rng.random() for _ in queried_needles] if config.depth is None else None

    def layout(count: int) -> tuple[_Layout, list[int]]:
        items = list(filler[:count])
        counts = list(filler_tokens[:count])
        for needle, depth in sorted(zip(distractors, distractor_depths), key=lambda pair: pair[1]):
            at = _nearest_boundary(counts, depth * sum(counts))
            items.insert(at, needle)
            counts.insert(at, len(tokenizer.encode(separator + needle)))
        if random_depths is None:
            at = _nearest_boundary(counts, config.depth * sum(counts))
            items[at:at] = queried_needles
            return _Layout(prefix, items, separator, suffix), list(range(at, at + len(queried_needles)))
        slots = []
        for needle, depth in zip(queried_needles, random_depths):
            at = _nearest_boundary(counts, depth * sum(counts))
            slots = [s + 1 if s >= at else s for s in slots] + [at]
            items.insert(at, needle)
            counts.insert(at, len(tokenizer.encode(separator + needle)))
        return _Layout(prefix, items, separator, suffix), slots

    kept = _largest_fitting(lambda n: layout(n)[0].render()[0], tokenizer, len(filler), config.length)
    final, needle_slots = layout(kept)
    prompt, offsets = final.render()
    context_start = len(prefix)
    context_end = len(prompt) - len(suffix)
    token_start = len(tokenizer.encode(prompt[:context_start]))
    token_end = len(tokenizer.encode(prompt[:context_end]))
    first = min(needle_slots)
    needle_start = len(tokenizer.encode(prompt[: offsets[first]]))
    block_end_char = offsets[max(needle_slots)] + len(final.items[max(needle_slots)])
    block_tokens = len(tokenizer.encode(prompt[:block_end_char])) - needle_start
    rest = max(token_end - token_start - block_tokens, 1)
    # Room for every gold value in a sentence that lists them ("A, and B."), and some to spare: 4 values of 7
    # digits did not fit the default 32 tokens, capping a perfect answer at 75. (RULER gives its NIAH 128.)
    answer_tokens = len(tokenizer.encode(" " + ", and ".join(answers) + "."))
    return TaskExample(
        example_id=f"niah_{config.variant}_{_set_name(config.seed, config.purpose)}_{index}",
        task=f"niah_{config.variant}",
        prompt=prompt,
        answers=answers,
        context=prompt[context_start:context_end],
        question=suffix.strip(),
        max_new_tokens=max(DEFAULT_MAX_NEW_TOKENS, answer_tokens + 16),
        metadata={
            "keys": query_keys,
            "needle_char_offsets": [offsets[s] for s in sorted(needle_slots)],
            "needle_token_start": needle_start,
            "context_token_span": [token_start, token_end],
            "depth": config.depth,
            "depth_actual": (needle_start - token_start) / rest,
            "num_tokens": len(tokenizer.encode(prompt)),
        },
    )


# ---------------------------------------------------------------- multi-query associative recall

MAX_MQAR_PAIRS = 5000


class MqarConfig(BaseModel):
    """Key-value pairs, then queries for some keys; answers are the queried values in order."""

    model_config = ConfigDict(extra="forbid")

    num_pairs: int = Field(32, ge=1, le=MAX_MQAR_PAIRS)
    num_queries: int = Field(4, ge=1)
    key_letters: int = Field(3, ge=2, le=8)
    value_digits: int = Field(3, ge=2, le=9)
    seed: int = 0
    purpose: Purpose = Field("train", description="salts the random streams (see NiahConfig.purpose)")

    @model_validator(mode="after")
    def _check_sizes(self) -> "MqarConfig":
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries ({self.num_queries}) cannot exceed num_pairs ({self.num_pairs})")
        if self.num_pairs > 9 * 10 ** (self.value_digits - 1):
            raise ValueError(f"{self.num_pairs} distinct values need more than value_digits={self.value_digits}")
        return self


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def generate_mqar(config: MqarConfig, num_examples: int) -> list[TaskExample]:
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    return [_mqar_example(config, index) for index in range(num_examples)]


def _mqar_example(config: MqarConfig, index: int) -> TaskExample:
    """Example `index` of the set `config` names: its own random stream, whatever the others are."""
    rng = _example_rng(config.seed, index, "mqar", config.purpose)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < config.num_pairs:
        key = "".join(rng.choice(_LETTERS) for _ in range(config.key_letters))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    low = 10 ** (config.value_digits - 1)
    values = [str(v) for v in rng.sample(range(low, 10 * low), config.num_pairs)]
    queried = rng.sample(range(config.num_pairs), config.num_queries)
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    queries = " ".join(keys[q] for q in queried)
    prompt = (
        f"Remember the value of every key.\nPairs: {pairs}\n"
        f"Give the values of these keys, in order: {queries}\nValues:"
    )
    return TaskExample(
        example_id=f"mqar_{_set_name(config.seed, config.purpose)}_{index}",
        task="mqar",
        prompt=prompt,
        answers=[values[q] for q in queried],
        context=f"Pairs: {pairs}",
        question=f"Give the values of these keys, in order: {queries}",
        metadata={"keys": [keys[q] for q in queried]},
    )


# ---------------------------------------------------------------- fact-recall corpus


class RecallCorpusConfig(BaseModel):
    """Documents of about `length` tokens of procedural prose with `num_facts` facts, each stated once early and
    restated once later. Places are drawn as fractions of the prose sentences: statements in [0, statement_zone),
    restatements in [0.5, 1). In the text they fall a little later (the title, statements and restatements before
    them take room too): with the defaults, statements reach about a quarter of the text, and a restatement can
    start just before its middle."""

    model_config = ConfigDict(extra="forbid")

    length: int = Field(2048, ge=64)
    num_facts: int = Field(6, ge=1, le=40)
    statement_zone: float = Field(0.15, gt=0.0, le=0.5)
    seed: int = 0
    purpose: Purpose = Field("train", description="salts the random streams (see NiahConfig.purpose)")


@dataclass
class Fact:
    subject: str  # e.g. "the keeper of the north gate is"
    value: str  # e.g. "Orsa Holm"
    statement_offset: int = -1  # character offsets in the document text
    recall_offset: int = -1
    recall_value_offset: int = -1  # where the value starts inside the restatement


@dataclass
class SyntheticDocument:
    doc_id: str
    text: str
    facts: list[Fact] = field(default_factory=list)


_RECALL_LEADS = ("As noted before,", "To repeat,", "As the record says,", "Recall that", "Once more:")


def _draw_facts(rng: random.Random, count: int) -> list[Fact]:
    facts: list[Fact] = []
    subjects: set[str] = set()
    while len(facts) < count:
        form = rng.randrange(3)
        if form == 0:
            subject = f"the keeper of the {rng.choice(PLACES)} is"
            value = f"{rng.choice(FIRST_NAMES)} {rng.choice(FAMILY_NAMES)}"
        elif form == 1:
            subject = f"the {rng.choice(COLORS)} {rng.choice(CONTAINERS)} holds"
            value = f"{rng.randint(11, 9999)} {rng.choice(GOODS)}"
        else:
            subject = f"the password of the {rng.choice(PLACES)} is"
            value = random_word_pair(rng)
        if subject not in subjects:  # one value per subject, or recall would be ambiguous
            subjects.add(subject)
            facts.append(Fact(subject=subject, value=value))
    return facts


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_recall_documents(
    config: RecallCorpusConfig, tokenizer: Tokenizer, num_documents: int
) -> list[SyntheticDocument]:
    if num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    return _every_example(lambda index: _recall_document(config, tokenizer, index), num_documents, config.length)


def _recall_document(config: RecallCorpusConfig, tokenizer: Tokenizer, index: int) -> SyntheticDocument:
    rng = _example_rng(config.seed, index, "recall", config.purpose)
    facts = _draw_facts(rng, config.num_facts)
    title = f"Ledger of the town of {rng.choice(FAMILY_NAMES)}ville, volume {rng.randint(1, 40)}."
    statements = [f"{_capitalize(fact.subject)} {fact.value}." for fact in facts]
    leads = [rng.choice(_RECALL_LEADS) for _ in facts]
    recalls = [f"{lead} {fact.subject} {fact.value}." for lead, fact in zip(leads, facts)]
    fixed_tokens = len(tokenizer.encode(" ".join([title, *statements, *recalls])))
    filler = _filler(lambda: prose_sentence(rng), tokenizer, max(config.length - fixed_tokens, 0), " ")
    # Statement and restatement places as fractions of the filler: early ones and second-half ones.
    statement_at = sorted(rng.uniform(0.0, config.statement_zone) for _ in facts)
    recall_order = list(range(len(facts)))
    rng.shuffle(recall_order)
    recall_at = sorted(rng.uniform(0.5, 1.0) for _ in facts)

    def items_for(count: int) -> tuple[list[str], dict[int, tuple[str, int]]]:
        # Insert from the back so earlier indices stay valid; remember which item is which fact.
        placed: list[tuple[int, int, str, str, int]] = []
        for order, (fraction, statement) in enumerate(zip(statement_at, statements)):
            placed.append((int(round(fraction * count)), 0, "statement", statement, order))
        for fraction, fact_index in zip(recall_at, recall_order):
            placed.append((int(round(fraction * count)), 1, "recall", recalls[fact_index], fact_index))
        items: list[str] = [title] + list(filler[:count])
        roles: dict[int, tuple[str, int]] = {}
        tagged: list[tuple[str, str, int]] = [("filler", text, -1) for text in items]
        for position, _, role, text, fact_index in sorted(placed, key=lambda p: (p[0], p[1]), reverse=True):
            tagged.insert(1 + position, (role, text, fact_index))
        for number, (role, _, fact_index) in enumerate(tagged):
            if role != "filler":
                roles[number] = (role, fact_index)
        return [text for _, text, _ in tagged], roles

    def build(count: int) -> str:
        return _Layout("", items_for(count)[0], " ", "").render()[0]

    kept = _largest_fitting(build, tokenizer, len(filler), config.length)
    items, roles = items_for(kept)
    text, offsets = _Layout("", items, " ", "").render()
    for number, (role, fact_index) in roles.items():
        fact = facts[fact_index]
        if role == "statement":
            fact.statement_offset = offsets[number]
        else:
            fact.recall_offset = offsets[number]
            fact.recall_value_offset = offsets[number] + len(items[number]) - len(fact.value) - 1
    return SyntheticDocument(doc_id=f"recall_{_set_name(config.seed, config.purpose)}_{index}", text=text, facts=facts)


def generate_recall_examples(
    config: RecallCorpusConfig, tokenizer: Tokenizer, num_examples: int
) -> list[TaskExample]:
    """One example per document: the text up to a restated fact's value; the answer is that value."""
    examples = []
    for document in generate_recall_documents(config, tokenizer, num_examples):
        rng = _example_rng(config.seed, int(document.doc_id.rsplit("_", 1)[1]), "recall-pick", config.purpose)
        fact = rng.choice(document.facts)
        prompt = document.text[: fact.recall_value_offset].rstrip(" ")
        examples.append(
            TaskExample(
                example_id=document.doc_id,
                task="fact_recall",
                prompt=prompt,
                answers=[fact.value],
                metadata={"subject": fact.subject, "statement_offset": fact.statement_offset},
            )
        )
    return examples


def write_documents_jsonl(documents: Sequence[SyntheticDocument], path: str | Path, text_column: str = "text") -> int:
    """Write documents as JSON lines ({text_column: text, "doc_id": ...}) for a DataConfig to read."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", encoding="utf-8") as handle:
        for document in documents:
            record = {text_column: document.text, "doc_id": document.doc_id}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(documents)


def mqar_for_length(length: int, tokenizer: Tokenizer, num_examples: int, seed: int,
                    purpose: Purpose = "train") -> list[TaskExample]:
    """MQAR examples with as many key-value pairs as keep the prompt within `length` tokens; `purpose` salts
    their random streams (see NiahConfig.purpose)."""

    def build(pairs: int, index: int) -> TaskExample:
        digits = next(d for d in range(2, 10) if pairs <= 9 * 10 ** (d - 1))
        config = MqarConfig(num_pairs=pairs, num_queries=min(4, pairs), value_digits=max(3, digits), seed=seed,
                            purpose=purpose)
        return _mqar_example(config, index)

    def fits(pairs: int, index: int) -> bool:
        return len(tokenizer.encode(build(pairs, index).prompt)) <= length

    def largest_count(index: int, guess: int) -> int:
        # Each example its own count: a subword tokenizer splits random keys and values into more or fewer
        # tokens, so a count that fits one example can overflow the next. The last example's count is tried
        # first (with a byte tokenizer it is every example's).
        if guess < MAX_MQAR_PAIRS and fits(guess, index) and not fits(guess + 1, index):
            return guess
        try:  # 1 pair and `extra` more, up to MqarConfig's bound
            return 1 + _largest_fitting(lambda extra: build(1 + extra, index).prompt, tokenizer, MAX_MQAR_PAIRS - 1,
                                        length)
        except LengthTooShortError as error:
            raise LengthTooShortError(f"--length {length} is too short for an MQAR prompt with a single key-value "
                                      f"pair ({error.needed} tokens)", error.needed) from None

    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    examples, count = [], 1
    for index in range(num_examples):
        count = largest_count(index, count)
        examples.append(build(count, index))
    return examples
