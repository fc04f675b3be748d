"""Tokenized documents of a source, made from its records and resumable after any of them.

`DocumentStream` turns the records a `RowSource` reads into `TokenizedDocument`s: tokenize in batches, add
BOS / EOS, drop documents shorter than `min_length` (counted), split a longer one into windows of `max_length`
tokens, at most `max_windows` of them, and drop the rest (counted as truncated).

A stream reads records in the source's order, or, with `shuffle_seed`, in a random order drawn from the seed
(see `RowSource.shuffled_rows`); a record's position in the order read is its `Row.index`.
The data cursor counts windows inside records: `position x max_windows + windows of it used`, so with
the default `max_windows=1` it is the position. `DocumentStream.iter_from(cursor)` restarts exactly
after the last document a consumer used (`document.next_cursor`), even inside a record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel

from refine.data.readers import Row, RowSource
from refine.data.sources import BadRowPolicy, DataConfig, DataSourceError, EmptySourceError, require_text
from refine.runtime import progress_bar
from refine.tokenizer import ByteTokenizer, Tokenizer


@dataclass(frozen=True, slots=True)
class TokenizedDocument:
    doc_id: str  # "<file>:<row>", then "#<window>" for a long document's later windows: readable in logs
    index: int  # its record's position in the order read (the record index in the source, unless shuffled)
    token_ids: list[int]
    next_cursor: int  # the data cursor after this document: resume with iter_from(next_cursor)
    truncated: bool = False  # tokens of its record past this document's windows were dropped
    window: int = 0  # which window of its record (0: the record's start, with its BOS)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DataStats(BaseModel):
    records_read: int = 0
    documents: int = 0
    tokens: int = 0
    too_short: int = 0
    blank: int = 0  # texts of nothing but whitespace and control characters (see is_blank)
    truncated: int = 0  # records whose tokens past max_windows x max_length were dropped
    split: int = 0  # records that became more than one document (max_windows > 1)
    short_tails: int = 0  # last windows shorter than min_length, dropped
    bad_rows: int = 0


# Whitespace and control characters (NUL, C1 controls): a text of only these has nothing to learn from.
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]*")


def is_blank(text: str) -> bool:
    """Whether `text` holds nothing but whitespace and control characters (an empty text included)."""
    return _BLANK.fullmatch(text) is not None


# Characters per token that a document's head may hold before it is cut (see DocumentStream._head); tokens
# average about 4 characters of text, and one byte-level token never covers more than one character.
HEAD_CHARS_PER_TOKEN = 32
_LAST_WHITESPACE = re.compile(r"\s\S*\Z")  # searched within [start, end): the last whitespace there


class DocumentStream:
    """Tokenized documents of a source; iterate it, or restart anywhere with `iter_from(cursor)`.

    `cursor` is the data cursor after the last document handed out (record position x max_windows + windows
    of that record used; the position when max_windows is 1: the record index, unless shuffled); save it with
    a checkpoint and pass it to `iter_from` to continue. `stats` counts what was read, kept, filtered,
    truncated and skipped."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.cursor = 0
        self.stats = DataStats()
        self._resume_record = self._windows_used = 0

    def __iter__(self) -> Iterator[TokenizedDocument]:
        return self.iter_from(self.cursor)

    def iter_from(self, cursor: int) -> Iterator[TokenizedDocument]:
        config = self.config
        if cursor < 0:
            raise ValueError(f"start cursor must be >= 0, got {cursor}")
        # A cursor inside a record: that record's first windows were used already.
        self._resume_record, self._windows_used = divmod(cursor, config.max_windows)
        record = self._resume_record
        policy = BadRowPolicy(config.skip_bad_rows)
        source = self.row_source(policy)
        if config.shuffle_seed is None:
            rows, known = source.rows(record, config.limit), source.count()
        else:
            rows, known = source.shuffled_rows(config.shuffle_seed, record, config.limit), source.record_count()
        self.cursor = cursor
        if known is not None and config.limit is not None:
            known = min(known, config.limit)
        total = None if known is None else max(known - record, 0)
        progress = progress_bar(total=total, desc="tokenizing", unit="doc", disable=not config.show_progress)
        bad_rows_before = self.stats.bad_rows
        records_before = self.stats.records_read
        documents_before = self.stats.documents
        rows_seen = 0
        text_rejections = 0  # bad rows found here rather than by the reader

        def account() -> None:
            # Records read = rows handed over + rows the reader rejected; keeps the bar and stats honest.
            self.stats.bad_rows = bad_rows_before + policy.count
            records = rows_seen + policy.count - text_rejections
            progress.update(records_before + records - self.stats.records_read)
            self.stats.records_read = records_before + records

        pending: list[tuple[Row, str]] = []
        try:
            while True:
                try:
                    try:
                        row = next(rows)
                    except StopIteration:
                        break
                    rows_seen += 1
                    rejected_before = policy.count
                    text = require_text(row.values[config.text_column], config.text_column, row.location, policy)
                    text_rejections += policy.count - rejected_before
                except DataSourceError:
                    # A malformed row, one without text, a damaged part of a file: hand out what was read
                    # before it (the cursor then points at it), then fail.
                    yield from self._flush(pending)
                    raise
                finally:
                    account()
                if text is None:
                    continue
                pending.append((row, text))
                if len(pending) >= config.tokenize_batch_size:
                    yield from self._flush(pending)
                    progress.set_postfix(kept=self.stats.documents, short=self.stats.too_short, bad=self.stats.bad_rows)
            yield from self._flush(pending)
        finally:
            progress.close()
        if cursor == 0 and self.stats.documents == documents_before:
            raise EmptySourceError(
                f"no document of {config.path!r} passed the filters (min_length={config.min_length}): "
                f"{self.stats.model_dump()}"
            )

    def row_source(self, policy: BadRowPolicy | None = None) -> RowSource:
        config = self.config
        return RowSource(config.path, columns=[config.text_column], fmt=config.format, policy=policy,
                         split=config.split)

    def _flush(self, pending: list[tuple[Row, str]]) -> Iterator[TokenizedDocument]:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        heads = [self._head(text) for _, text in batch]
        encoded = self.tokenizer.encode_batch(heads)
        for index, ((_, text), head) in enumerate(zip(batch, heads)):
            # A cut text is trusted only when its tokens overflow the windows: the kept tokens then come from
            # before the cut, and the document is truncated either way. A text of unusually long tokens is
            # encoded whole.
            if len(head) < len(text) and len(encoded[index]) <= self.config.max_length * self.config.max_windows:
                encoded[index] = self.tokenizer.encode(text)
        for (row, text), ids in zip(batch, encoded):
            documents = [] if self._blank(text) else self._finish(row, ids)
            for document in documents:
                self.cursor = document.next_cursor  # a restart goes on after it
                yield document
            self.cursor = (row.index + 1) * self.config.max_windows  # used, or filtered

    def _head(self, text: str) -> str:
        """The text up to the last whitespace (any: an ideographic space too) before max_length x max_windows x
        HEAD_CHARS_PER_TOKEN characters: a document keeps at most max_length x max_windows tokens, and tokenizing
        a multi-megabyte text whole takes some twenty times its size in memory (hundreds of times for one long
        word) for tokens thrown away. Tokenizers split words at whitespace, so the tokens before a cut there are
        those of the whole text. Without whitespace in the limit's second half (text without spaces: Chinese or
        Japanese, minified code), the cut is at the limit: a merge across it changes only tokens near it, some
        HEAD_CHARS_PER_TOKEN times further than the tokens kept, which _flush trusts only when they overflow the
        windows."""
        if self.config.max_length is None:
            return text
        limit = self.config.max_length * self.config.max_windows * HEAD_CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        if isinstance(self.tokenizer, ByteTokenizer):  # each character becomes its own bytes: any cut is exact
            return text[:limit]
        last_space = _LAST_WHITESPACE.search(text, limit // 2, limit)
        return text[:last_space.start() if last_space is not None else limit]

    def _blank(self, text: str) -> bool:
        """Count and drop a blank text (is_blank): its tokens would be padding-like noise, trained on as text.
        An empty text stays a too-short document, as it always was."""
        if text and is_blank(text):
            self.stats.blank += 1
            return True
        return False

    def _finish(self, row: Row, ids: list[int]) -> list[TokenizedDocument]:
        """The documents of one record: its tokens (BOS first) in windows of max_length, at most max_windows
        of them, less those a resumed stream used already. A record shorter than min_length gives none, and a
        last window shorter than min_length is dropped (both counted). Later windows get no BOS of their own:
        they continue the record's text."""
        config = self.config
        bos = [self.tokenizer.bos_id] if config.add_bos and self.tokenizer.bos_id is not None else []
        token_ids = bos + list(ids)
        size = config.max_length
        truncated = size is not None and len(token_ids) > size * config.max_windows
        if truncated:
            # A cut document did not end here, so it gets no EOS.
            token_ids = token_ids[: size * config.max_windows]
            self.stats.truncated += 1
        elif config.add_eos and (size is None or len(token_ids) % size or not token_ids):
            token_ids.append(self.tokenizer.eos_id)  # where the last window has room for it
        if size is None or not token_ids:
            windows = [token_ids]
        else:
            windows = [token_ids[start: start + size] for start in range(0, len(token_ids), size)]
        if len(windows[0]) < config.min_length:
            self.stats.too_short += 1
            return []
        if len(windows[-1]) < config.min_length:
            windows.pop()
            self.stats.short_tails += 1
        if len(windows) > 1:
            self.stats.split += 1
        used = self._windows_used if row.index == self._resume_record else 0
        start = row.index * config.max_windows  # the cursor at this record's position
        documents = []
        for window, tokens in enumerate(windows[used:], start=used):
            last = window == len(windows) - 1
            self.stats.documents += 1
            self.stats.tokens += len(tokens)
            documents.append(TokenizedDocument(
                doc_id=row.doc_id if window == 0 else f"{row.doc_id}#{window}", index=row.index, token_ids=tokens,
                next_cursor=start + config.max_windows if last else start + window + 1,
                truncated=truncated and last, window=window))
        return documents


def iter_documents(config: DataConfig, tokenizer: Tokenizer, cursor: int = 0) -> Iterator[TokenizedDocument]:
    """Shorthand for `DocumentStream(config, tokenizer).iter_from(cursor)`."""
    return DocumentStream(config, tokenizer).iter_from(cursor)
