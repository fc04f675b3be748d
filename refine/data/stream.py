"""Endless, resumable document batches for training, from a file source or the synthetic corpus."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refine.config import RunConfig
from refine.data.batches import DocumentBatch, batch_documents
from refine.data.documents import DocumentStream
from refine.data.formats import detect_format, source_files
from refine.data.sources import DataConfig
from refine.data.synthetic import (
    LengthTooShortError, NiahConfig, Purpose, RecallCorpusConfig, generate_niah, generate_recall_documents,
    mqar_for_length,
)
from refine.files import write_atomically
from refine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Item = tuple[str, list[int], int]  # (doc_id, token ids, cursor to resume after this document)


# Tokens a task document (NIAH, MQAR) keeps after its prompt, within data.seq_len: the answers, the space
# before them, the closing newline and the BOS the document starts with.
ANSWER_ROOM = 32


def recall_corpus_config(length: int, seq_len: int, seed: int, purpose: Purpose = "train") -> RecallCorpusConfig:
    """The recall documents of a data.seq_len: `length` tokens of text (data.seq_len less the BOS), about one
    fact per 200 tokens, which keeps room for the prose that separates statement and recall."""
    return RecallCorpusConfig(length=length, num_facts=max(1, min(6, seq_len // 200)), seed=seed,
                              purpose=purpose)


def _synthetic_texts(kind: str, config: RunConfig, tokenizer: Tokenizer, count: int,
                     purpose: Purpose = "train") -> list[tuple[str, str]]:
    """(doc_id, text) of one kind; task documents are prompt + answer, so recall is in the training text.
    Every text fits data.seq_len tokens with the BOS the corpus adds; a data.seq_len too short for a kind's
    fixed text fails naming the settings and the least data.seq_len that works. `purpose` salts the random
    streams (refine.data.synthetic): "heldout" documents never come from a stream a training corpus drew."""
    seq_len, seed = config.data.seq_len, config.train.seed
    bos = 1 if tokenizer.bos_id is not None else 0
    # What a length given to the generator leaves of data.seq_len, and the least length the generator accepts.
    reserved, least = (bos, 64) if kind == "recall" else (ANSWER_ROOM, 32 if kind == "niah" else 1)
    length = seq_len - reserved
    fitted = max(length, least)
    try:
        if kind == "recall":
            corpus = recall_corpus_config(fitted, seq_len, seed, purpose)
            texts = [(d.doc_id, d.text) for d in generate_recall_documents(corpus, tokenizer, count)]
        elif kind == "niah":
            examples = generate_niah(NiahConfig(variant="single", length=fitted, seed=seed, purpose=purpose),
                                     tokenizer, count)
        else:
            examples = mqar_for_length(fitted, tokenizer, count, seed, purpose)
        if length < least:  # fitted the generator's least length, which is more than data.seq_len leaves
            raise LengthTooShortError(f"length {length} is below {least}", least)
    except LengthTooShortError as error:
        raise ValueError(
            f"data.seq_len={seq_len} is too short for the {kind} documents of data.synthetic_tasks="
            f"{config.data.synthetic_tasks}: their text without filler takes up to {error.needed} tokens, so they "
            f"need data.seq_len >= {error.needed + reserved}"
        ) from None
    if kind == "recall":
        return texts
    gap = lambda prompt: "" if prompt[-1:].isspace() else " "  # noqa: E731
    return [(f"{kind}:{e.example_id}", f"{e.prompt}{gap(e.prompt)}{' '.join(e.answers)}\n") for e in examples]


def synthetic_documents(config: RunConfig, tokenizer: Tokenizer,
                        purpose: Purpose = "train") -> list[tuple[str, list[int]]]:
    """The synthetic corpus: data.num_documents documents, the kinds interleaved (the first kinds get one more
    when they do not divide evenly), less those shorter than data.min_length (counted and logged)."""
    spec = config.data
    kinds = spec.synthetic_tasks
    counts = [spec.num_documents // len(kinds) + (k < spec.num_documents % len(kinds)) for k in range(len(kinds))]
    by_kind = [_synthetic_texts(kind, config, tokenizer, count, purpose) for kind, count in zip(kinds, counts)]
    # Interleave the kinds so every batch mixes them.
    texts = [texts[i] for i in range(max(counts)) for texts in by_kind if i < len(texts)]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []  # as file sources do
    docs = []
    too_short = truncated = 0
    for doc_id, text in texts:
        ids = bos + tokenizer.encode(text)
        if len(ids) > spec.seq_len:  # a text the generator fitted, that this tokenizer splits differently
            ids = ids[: spec.seq_len]
            truncated += 1
        if len(ids) >= spec.min_length:
            docs.append((doc_id, ids))
        else:
            too_short += 1
    # Dropped and cut documents change what the model trains on: say so, as file sources do for each pass.
    level = logging.WARNING if too_short or truncated else logging.INFO
    logger.log(level, "synthetic corpus of data.synthetic_tasks=%s: %d documents generated, %d kept, %d too short "
                      "for data.min_length=%d, %d truncated to data.seq_len=%d",
               kinds, len(texts), len(docs), too_short, spec.min_length, truncated, spec.seq_len)
    if not docs:
        raise ValueError(f"the synthetic corpus produced no document of data.min_length={spec.min_length}: all "
                         f"{len(texts)} are shorter (data.seq_len={spec.seq_len})")
    return docs


def pass_shuffle_seed(seed: int, pass_number: int) -> int:
    """The seed of a shuffled pass's order: every pass of a run has its own, drawn from train.seed."""
    return int(np.random.SeedSequence([seed % 2**64, pass_number]).generate_state(1, np.uint64)[0])


def _source_stream(config: RunConfig, tokenizer: Tokenizer, pass_number: int = 0) -> DocumentStream:
    spec = config.data
    shuffle_seed = pass_shuffle_seed(config.train.seed, pass_number) if spec.shuffle else None
    data = DataConfig(path=spec.source, format=spec.format, text_column=spec.text_column,
                      min_length=spec.min_length, max_length=spec.seq_len, max_windows=spec.max_windows,
                      skip_bad_rows=spec.skip_bad_rows, shuffle_seed=shuffle_seed, show_progress=False)
    return DocumentStream(data, tokenizer)


def file_documents(config: RunConfig, tokenizer: Tokenizer, cursor: int, warn: bool = True,
                   pass_number: int = 0) -> Iterator[Item]:
    """One pass over data.source from `cursor`: (doc_id, token ids, cursor after it); dropped and cut documents
    are logged. With data.shuffle, the pass reads records in its own random order (see pass_shuffle_seed)."""
    spec = config.data
    stream = _source_stream(config, tokenizer, pass_number)
    # What a document keeps: data.seq_len tokens, or data.max_windows windows of them.
    kept = (f"data.seq_len={spec.seq_len} tokens" if spec.max_windows == 1 else
            f"{_describe_windows(_windows(config))} = {spec.seq_len * spec.max_windows} tokens")
    early = warn  # a pass over a large source takes long: say at once that documents are dropped or cut
    for doc in stream.iter_from(cursor):
        stats = stream.stats
        if early and (stats.too_short or stats.blank or stats.truncated or stats.short_tails):
            early = False
            tails = f", {stats.short_tails} last windows dropped as too short" if spec.max_windows > 1 else ""
            logger.warning("data.source=%r drops documents shorter than data.min_length=%d or blank (only whitespace "
                           "and control characters) and cuts those longer than %s (by %s %d: %d dropped as too "
                           "short, %d as blank, %d cut%s); the end of this pass reports the counts", spec.source,
                           spec.min_length, kept, "position" if spec.shuffle else "record", doc.index + 1,
                           stats.too_short, stats.blank, stats.truncated, tails)
        yield doc.doc_id, doc.token_ids, doc.next_cursor  # filtered and bad rows count too
    # Dropped, cut and skipped documents change what the model trains on: say so once per pass, as a warning
    # when `warn` (until a whole pass was reported: later passes repeat its counts).
    stats = stream.stats
    dropped = stats.too_short or stats.blank or stats.truncated or stats.short_tails or stats.bad_rows
    level = logging.WARNING if warn and dropped else logging.INFO
    windows = (f"{stats.split} split into windows of data.seq_len (and {stats.short_tails} last windows shorter "
               f"than data.min_length dropped), " if spec.max_windows > 1 else "")
    where = (f"pass {pass_number + 1} over data.source={spec.source!r} (shuffled) from position" if spec.shuffle
             else f"pass over data.source={spec.source!r} from record")
    logger.log(level, "%s %d: %d records read, %d documents kept, %s"
                      "%d too short for data.min_length=%d, %d blank, %d truncated to %s, %d bad rows skipped",
               where, cursor // spec.max_windows, stats.records_read, stats.documents, windows,
               stats.too_short, spec.min_length, stats.blank, stats.truncated, kept, stats.bad_rows)


@dataclass
class DataPosition:
    """Where the data stream stands, counting passes: the stream's cursor restarts with every pass over
    the source, so (epoch, cursor) is what orders batches and seeds their rollouts (unique per batch)."""

    epoch: int
    cursor: int  # -1 before the first batch
    span: int = 0  # with data.shuffle, the cursor counts on across passes, this much a pass (shuffled_pass_span)

    def advance(self, cursor: int, document_cursors: list[int] | tuple[int, ...] = ()) -> int:
        """The epoch of the next batch, whose stream cursor (position after it) is `cursor`.

        `document_cursors`, the position after each of its documents, counts every pass the batch starts:
        a batch of more documents than a pass holds starts several. Without them only the batch's end is
        compared with the last one's, which counts at most one. Both count the same for batches smaller
        than a pass (the usual run), so their epochs, and the rollout seeds drawn from them, stay as they were."""
        for position in document_cursors or (cursor,):
            if self.span:
                self.epoch = (position - 1) // self.span  # a cursor in a pass is past its first record
            elif position <= self.cursor:
                self.epoch += 1  # the stream restarted a pass
            self.cursor = position
        return self.epoch


def shuffled_pass_span(config: RunConfig, tokenizer: Tokenizer) -> int:
    """How far the data cursor moves in one shuffled pass: the source's records x data.max_windows."""
    return _source_stream(config, tokenizer).row_source().record_count() * config.data.max_windows


def document_stream(config: RunConfig, tokenizer: Tokenizer, start_cursor: int = 0) -> Iterator[Item]:
    """Documents forever, cycling over the source. The cursor restarts at 0 with each pass; with data.shuffle
    it counts on instead (pass x shuffled_pass_span + the cursor in the pass), since a resume needs the pass
    to draw its order."""
    if config.data.source == "synthetic":
        docs = synthetic_documents(config, tokenizer)
        _warn_if_batches_repeat(config, len(docs))
        index = start_cursor % len(docs)
        while True:
            doc_id, ids = docs[index]
            index = (index + 1) % len(docs)
            yield doc_id, ids, index
    span = shuffled_pass_span(config, tokenizer) if config.data.shuffle else 0
    pass_number, epoch_cursor = divmod(start_cursor, span) if span else (0, start_cursor)
    warn = True
    while True:
        produced = 0
        for doc_id, ids, cursor in file_documents(config, tokenizer, epoch_cursor, warn=warn, pass_number=pass_number):
            produced += 1
            yield doc_id, ids, pass_number * span + cursor
        if produced == 0 and epoch_cursor == 0:  # a resume at the very end of a pass yields nothing: fine
            raise ValueError(f"data.source={config.data.source!r} yielded no document of at least "
                             f"data.min_length={config.data.min_length} tokens")
        if warn and epoch_cursor == 0:  # the first whole pass: how many documents one holds
            _warn_if_batches_repeat(config, produced)
        warn = warn and epoch_cursor != 0  # a resumed pass counted only part of the source
        epoch_cursor = 0
        pass_number += 1
        if span and (now := shuffled_pass_span(config, tokenizer)) != span:
            raise ValueError(f"data.source={config.data.source!r} changed during the run: a shuffled run's data "
                             f"cursor counts passes of {span // config.data.max_windows} records, and it holds "
                             f"{now // config.data.max_windows} now; resume with --resume to count in the source "
                             f"as it is now")


def _warn_if_batches_repeat(config: RunConfig, documents_per_pass: int) -> None:
    """Say when a batch holds more documents than a pass over the source: the stream cycles within the batch, so
    each batch trains on some documents twice or more (their rollouts are drawn apart)."""
    if documents_per_pass < config.train.batch_size:
        source = ("the synthetic corpus (data.num_documents)" if config.data.source == "synthetic"
                  else f"a pass over data.source={config.data.source!r}")
        logger.warning("%s holds %d documents, fewer than train.batch_size=%d: every batch holds some of them more "
                       "than once", source, documents_per_pass, config.train.batch_size)


SOURCE_RECORD = "data_source.json"  # in the run directory: what the run's data cursor counts records of
# Raised whenever the same settings generate other synthetic documents, so that a resumed run says its cursor
# now counts in another corpus. 2: recall documents leave room for BOS; data.num_documents is met exactly.
SYNTHETIC_GENERATOR = 2


def source_identity(config: RunConfig) -> dict[str, Any]:
    """What the data cursor indexes: a source path's files (relative names and sizes), or the synthetic
    corpus' settings: every one that changes its list of kept documents, which the cursor counts in."""
    spec = config.data
    if spec.source == "synthetic":
        return {"synthetic": {"num_documents": spec.num_documents, "tasks": spec.synthetic_tasks,
                              "seq_len": spec.seq_len, "min_length": spec.min_length, "seed": config.train.seed,
                              "generator": SYNTHETIC_GENERATOR}}
    root = Path(spec.source)
    fmt = detect_format(root) if spec.format == "auto" else spec.format
    if root.is_file():
        files = [root]
    elif fmt == "hf":  # a save_to_disk folder: its arrow files and the JSON files that describe them
        files = sorted(path for path in root.rglob("*")
                       if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts))
    else:  # the files the source reads (not a README beside them, nor hidden copies)
        files = source_files(root, fmt)
    identity: dict[str, Any] = {"files": [[path.name if path == root else str(path.relative_to(root)),
                                           path.stat().st_size] for path in files]}
    if _windows(config):
        identity["windows"] = _windows(config)
    if _shuffle(config):
        identity["shuffle"] = _shuffle(config)
    return identity


def _shuffle(config: RunConfig) -> dict[str, int] | None:
    """What a shuffled run's data cursor counts in: the orders drawn from train.seed."""
    return {"seed": config.train.seed} if config.data.shuffle else None


def _describe_shuffle(shuffle: dict[str, int] | None) -> str:
    if shuffle is None:
        return "data.shuffle=false"
    if not isinstance(shuffle, dict) or "seed" not in shuffle:
        return f"the shuffle {shuffle!r}"  # a damaged record
    return f"data.shuffle=true with train.seed={shuffle['seed']}"


def _windows(config: RunConfig) -> dict[str, int] | None:
    """What the data cursor counts inside a record: windows of data.seq_len tokens, at most data.max_windows."""
    spec = config.data
    return {"seq_len": spec.seq_len, "max_windows": spec.max_windows} if spec.max_windows > 1 else None


def _describe_windows(windows: dict[str, int] | None) -> str:
    if windows is None:
        return "data.max_windows=1"
    if not isinstance(windows, dict) or not {"max_windows", "seq_len"} <= windows.keys():
        return f"the windows {windows!r}"  # a damaged record
    return f"data.max_windows={windows['max_windows']} x data.seq_len={windows['seq_len']}"


def check_resumed_cursor(config: RunConfig, out_dir: Path) -> None:
    """Refuse to resume a run whose data cursor counts other windows or another order of records. The cursor
    is position x data.max_windows + window: another data.max_windows would resume at another record
    altogether (and another data.seq_len inside another part of one); with data.shuffle the position is in
    an order drawn from train.seed, so shuffling on or off, or another seed, resumes elsewhere too. Without
    a readable source record, which the cursor counts is unknown: a resume with windows or shuffling is
    refused then, and one without them goes on (check_source says the record was lost)."""
    if config.data.source == "synthetic":
        return
    record = out_dir / SOURCE_RECORD
    now = {"windows": _windows(config), "shuffle": _shuffle(config)}
    try:
        recorded = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if now == {"windows": None, "shuffle": None}:
            return
        settings = f"data.max_windows={config.data.max_windows}" if now["windows"] else "data.shuffle=true"
        raise ValueError(f"{settings}: {record} cannot be read ({type(error).__name__}), so what this run's data "
                         f"cursor counts is unknown (runs started before data.max_windows and data.shuffle existed "
                         f"have no such record, and count neither): resume with data.max_windows=1 and "
                         f"data.shuffle=false, or start a fresh run") from None
    if not isinstance(recorded, dict) or "files" not in recorded:
        return  # another source then (the synthetic corpus): check_source says the source changed
    before = {"windows": recorded.get("windows"), "shuffle": recorded.get("shuffle")}
    if before["windows"] != now["windows"]:
        raise ValueError(f"this run's data cursor counts windows of {_describe_windows(before['windows'])} ({record}), "
                         f"this resume has {_describe_windows(now['windows'])}: resume with "
                         f"{_describe_windows(before['windows'])}, or start a fresh run")
    if before["shuffle"] != now["shuffle"]:
        raise ValueError(f"this run's data cursor counts records in the order of {_describe_shuffle(before['shuffle'])} "
                         f"({record}), this resume has {_describe_shuffle(now['shuffle'])}: resume with "
                         f"{_describe_shuffle(before['shuffle'])}, or start a fresh run")


def check_source(config: RunConfig, out_dir: Path, resumed: bool) -> str | None:
    """Record the source a fresh run reads; for a resumed run, say so when it changed since (files added,
    removed or resized): the data cursor then counts records of another source, and resumes elsewhere."""
    record, current = out_dir / SOURCE_RECORD, source_identity(config)
    if not resumed or not record.exists():
        write_atomically(record, json.dumps(current))
        return None
    try:
        recorded = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        write_atomically(record, json.dumps(current))
        return (f"{record} could not be read ({type(err).__name__}: {err}), so whether data.source="
                f"{config.data.source!r} changed since this run started is unknown; it is recorded anew")
    if not isinstance(recorded, dict):
        recorded = {"record": recorded}
    if recorded == current:
        return None
    if "files" in recorded and "files" in current and recorded["files"] != current["files"]:
        before, now = dict(map(tuple, recorded["files"])), dict(map(tuple, current["files"]))
        changed = sorted(set(before) ^ set(now) | {name for name in set(before) & set(now) if before[name] != now[name]})
        what = f"{len(changed)} files added, removed or resized, e.g. {changed[0]!r}"
    else:
        what = f"was {recorded}, now {current}"
    return (f"data.source={config.data.source!r} changed since this run started ({what}): the resumed data "
            f"cursor counts records of the source as it is now")


def document_batches(config: RunConfig, tokenizer: Tokenizer, start_cursor: int = 0) -> Iterator[DocumentBatch]:
    pad_id = getattr(tokenizer, "pad_id", None) or 0
    return batch_documents(document_stream(config, tokenizer, start_cursor), config.train.batch_size, pad_id)
