import json

import pytest
from test_data_sources import TOKENIZER, config, texts_of, write_jsonl

from refine.data.documents import DocumentStream, iter_documents
from refine.data.sources import BadRowError, EmptySourceError

BOS, EOS = TOKENIZER.bos_id, TOKENIZER.eos_id


# ---------------------------------------------------------------- formats


def test_jsonl_documents_get_bos_and_keep_source_order(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["first doc", "second", "third one"])
    documents = list(iter_documents(config(path), TOKENIZER))
    assert texts_of(documents) == ["first doc", "second", "third one"]
    assert all(document.token_ids[0] == BOS for document in documents)
    assert [d.index for d in documents] == [0, 1, 2]
    assert [d.doc_id for d in documents] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]


def test_min_length_filters_and_max_length_truncates_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["abc", "a", "abcdefghij", ""])
    stream = DocumentStream(config(path, min_length=3, max_length=6, add_eos=True), TOKENIZER)
    documents = list(stream)
    # "abc" -> BOS a b c EOS (5); "a" -> BOS a EOS (3 >= 3, kept); long one cut to 6 without EOS; "" -> BOS EOS (2)
    assert [d.token_ids for d in documents] == [
        [BOS, *b"abc", EOS],
        [BOS, *b"a", EOS],
        [BOS, *b"abcde"],
    ]
    assert [d.truncated for d in documents] == [False, False, True]
    assert stream.stats.too_short == 1 and stream.stats.truncated == 1 and stream.stats.documents == 3
    assert stream.stats.records_read == 4 and stream.stats.tokens == 5 + 3 + 6


def test_resume_skips_filtered_records_exactly_once(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["long enough", "x", "y", "also long", "z", "long again"])
    cfg = config(path, min_length=5, tokenize_batch_size=2)
    stream = DocumentStream(cfg, TOKENIZER)
    iterator = iter(stream)
    first = next(iterator)
    second = next(iterator)
    assert texts_of([first, second]) == ["long enough", "also long"]
    assert stream.cursor == second.index + 1 == 4
    rest = list(DocumentStream(cfg, TOKENIZER).iter_from(stream.cursor))
    assert texts_of(rest) == ["long again"]


# ---------------------------------------------------------------- bad input


def test_everything_filtered_raises_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    with pytest.raises(EmptySourceError, match="no document .* passed the filters .*'too_short': 2"):
        list(iter_documents(config(path, min_length=10), TOKENIZER))


def test_a_huge_document_is_tokenized_only_as_far_as_it_is_kept(tmp_path, monkeypatch):
    from test_tokenizer import write_bpe_tokenizer

    from refine.tokenizer import load_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    words = " ".join(f"word{i % 97} and some more text" for i in range(40_000))  # about 1.2 million characters
    # Text without ASCII whitespace: Japanese whose paragraphs open with an ideographic space, and one long word.
    japanese = "".join(f"\u3000第{i}段落の文章です。次の文も続きます。" for i in range(5_000))
    # Whitespace only at its start: a cut there would keep too few characters, and the whole text be tokenized.
    titled = "title " + "漢字" * 2_500
    texts = [words, "short text " * 20, "x" * 50_000, japanese, titled]
    source = write_jsonl(tmp_path / "huge.jsonl", texts)
    for tokenizer in (TOKENIZER, load_tokenizer(tmp_path / "tok")):
        seen: list[int] = []
        encode_batch = tokenizer.encode_batch
        # monkeypatch restores the shared TOKENIZER for later tests (the lambda would call the BPE tokenizer's).
        monkeypatch.setattr(tokenizer, "encode_batch",
                            lambda texts, seen=seen, encode_batch=encode_batch: seen.extend(map(len, texts))
                            or encode_batch(texts))
        stream = DocumentStream(config(source, max_length=64, min_length=4), tokenizer)
        documents = list(stream)
        # No long text was tokenized whole: one with whitespace is cut at the last (an ideographic space too),
        # one without at the limit; the tokens kept are those of the whole text.
        limit = 64 * 32
        if tokenizer is TOKENIZER:  # bytes: any cut is exact
            assert seen == [limit, len(texts[1]), limit, limit, limit]
        else:  # the last whitespace before the limit, in the limit's second half, else the limit
            assert seen == [texts[0].rfind(" ", 0, limit), len(texts[1]), limit, texts[3].rfind("\u3000", 0, limit),
                            limit]
            assert texts[3][limit] == "\u3000" and seen[3] < limit  # not the whitespace at the limit itself
        assert seen[3] >= limit // 2 and len(texts[3]) > 10 * seen[3]
        for document, text in zip(documents, texts):
            whole = [tokenizer.bos_id] + tokenizer.encode(text)
            assert document.token_ids == (whole[:64] if len(whole) > 64 else whole + [tokenizer.eos_id])
        assert stream.stats.truncated == 5 and len(documents) == 5


# ---------------------------------------------------------------- windows of long documents


def test_a_long_document_becomes_consecutive_windows_and_past_max_windows_is_cut(tmp_path):
    # With BOS: 26 tokens -> 10 + 10 + 6; 3 tokens (too short); 41 -> three windows of 10, the rest cut;
    # 10 tokens -> one whole window; 23 -> 10 + 10 + a last window of 3, under min_length=4.
    path = write_jsonl(tmp_path / "docs.jsonl", ["a" * 25, "bb", "c" * 40, "d" * 9, "e" * 22])
    stream = DocumentStream(config(path, min_length=4, max_length=10, max_windows=3), TOKENIZER)
    documents = list(stream)
    assert [d.doc_id for d in documents] == [
        "docs.jsonl:1", "docs.jsonl:1#1", "docs.jsonl:1#2", "docs.jsonl:3", "docs.jsonl:3#1", "docs.jsonl:3#2",
        "docs.jsonl:4", "docs.jsonl:5", "docs.jsonl:5#1"]
    # The windows are the record's tokens in order, BOS only at its start; nothing between them is lost.
    assert documents[0].token_ids + documents[1].token_ids + documents[2].token_ids == [BOS, *b"a" * 25]
    assert documents[3].token_ids + documents[4].token_ids + documents[5].token_ids == [BOS, *b"c" * 29]
    assert documents[7].token_ids + documents[8].token_ids == [BOS, *b"e" * 19]
    assert all(len(d.token_ids) <= 10 for d in documents)
    assert [d.window for d in documents] == [0, 1, 2, 0, 1, 2, 0, 0, 1]
    assert [d.truncated for d in documents] == [False, False, False, False, False, True, False, False, False]
    assert stream.stats.model_dump() == {
        "records_read": 5, "documents": 9, "tokens": 26 + 30 + 10 + 20, "too_short": 1, "blank": 0, "truncated": 1,
        "split": 3, "short_tails": 1, "bad_rows": 0}


def test_windows_get_eos_only_where_the_record_ends_inside_them(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a" * 12, "b" * 9, "c" * 40])
    documents = list(iter_documents(config(path, min_length=2, max_length=5, max_windows=3, add_eos=True), TOKENIZER))
    # 13 tokens + EOS -> 5, 5, 4; 10 tokens fill two windows (no room for EOS); 41 are cut to 15, no EOS.
    assert [d.token_ids for d in documents] == [
        [BOS, *b"aaaa"], [*b"aaaaa"], [*b"aaa", EOS], [BOS, *b"bbbb"], [*b"bbbbb"],
        [BOS, *b"cccc"], [*b"ccccc"], [*b"ccccc"]]


def test_a_record_that_fills_its_last_window_gets_no_eos_window_of_its_own(tmp_path):
    """BOS + 4 bytes fill a 5-token window: the EOS has no room and is left out, not made a one-token window of its
    own that min_length then drops and counts as a short tail."""
    path = write_jsonl(tmp_path / "docs.jsonl", ["abcd"])
    stream = DocumentStream(config(path, min_length=2, max_length=5, max_windows=1, add_eos=True), TOKENIZER)
    assert [d.token_ids for d in stream] == [[BOS, *b"abcd"]]
    assert (stream.stats.split, stream.stats.short_tails, stream.stats.truncated) == (0, 0, 0)


@pytest.mark.parametrize("max_windows", [1, 2, 4])
def test_a_stream_resumes_exactly_after_every_document_even_inside_a_record(tmp_path, max_windows):
    rows = ["a" * 33, "", "b" * 7, "c" * 70, "   ", "d" * 15, "e" * 8]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    settings = config(path, min_length=6, max_length=8, max_windows=max_windows)
    documents = list(iter_documents(settings, TOKENIZER))
    whole = [(d.doc_id, d.token_ids) for d in documents]
    assert len(whole) == {1: 5, 2: 8, 4: 12}[max_windows]
    for position, document in enumerate(documents):
        rest = [(d.doc_id, d.token_ids) for d in iter_documents(settings, TOKENIZER, cursor=document.next_cursor)]
        assert rest == whole[position + 1:]
    # The cursor counts windows inside records: with one window it is the record index, as it always was.
    cursors = [d.next_cursor for d in documents]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    if max_windows == 1:
        assert cursors == [d.index + 1 for d in documents]


def test_a_huge_document_is_tokenized_only_as_far_as_its_windows_keep(tmp_path, monkeypatch):
    text = " ".join(f"word{i}" for i in range(200_000))  # about 1.3 million characters
    source = write_jsonl(tmp_path / "huge.jsonl", [text])
    seen: list[int] = []
    encode_batch = TOKENIZER.encode_batch
    monkeypatch.setattr(TOKENIZER, "encode_batch", lambda texts: seen.extend(map(len, texts)) or encode_batch(texts))
    documents = list(iter_documents(config(source, max_length=64, max_windows=4), TOKENIZER))
    assert seen == [64 * 4 * 32]
    assert [token for d in documents for token in d.token_ids] == [BOS, *text.encode()[:64 * 4 - 1]]


# ---------------------------------------------------------------- review fixes


def test_an_empty_text_is_too_short_not_a_one_token_document(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["", "hello"])
    stream = DocumentStream(config(path), TOKENIZER)
    assert texts_of(stream) == ["hello"] and stream.stats.too_short == 1


def test_a_row_without_text_hands_out_the_documents_read_before_it_like_a_malformed_row(tmp_path):
    for name, bad_line in [("malformed", b'{"text": oops}'), ("null", b'{"text": null}'), ("number", b'{"text": 5}')]:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b'{"text": "aa"}\n{"text": "bb"}\n' + bad_line + b'\n{"text": "dd"}\n')
        stream = DocumentStream(config(path), TOKENIZER)  # tokenize_batch_size 64: both wait in one batch
        received = []
        with pytest.raises(BadRowError, match=rf"{name}.jsonl, line 3"):
            for document in stream:
                received.append(document)
        assert texts_of(received) == ["aa", "bb"], name
        assert stream.cursor == 2, name  # a restart reads the bad row again, and fails on it again


# ---------------------------------------------------------------- shuffled reads


@pytest.mark.parametrize("max_windows", [1, 3])
def test_a_shuffled_stream_resumes_exactly_after_every_document(tmp_path, max_windows, caplog):
    rows = [f"{letter}" * length for letter, length in zip("abcdefghij", [33, 3, 7, 70, 15, 8, 40, 2, 25, 12])]
    rows[4] = "   "  # blank
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows[:6]) + "{broken\n"
                    + "".join(json.dumps({"text": row}) + "\n" for row in rows[6:]))
    settings = config(path, min_length=6, max_length=8, max_windows=max_windows, shuffle_seed=11, skip_bad_rows=True)
    stream = DocumentStream(settings, TOKENIZER)
    documents = list(stream.iter_from(0))
    assert stream.stats.bad_rows == 1 and stream.stats.records_read == 11
    in_order = list(iter_documents(settings.model_copy(update={"shuffle_seed": None}), TOKENIZER))
    assert sorted(d.token_ids for d in documents) == sorted(d.token_ids for d in in_order)
    assert [d.doc_id for d in documents if d.window == 0] != [d.doc_id for d in in_order if d.window == 0]
    whole = [(d.doc_id, d.token_ids) for d in documents]
    for position, document in enumerate(documents):
        rest = [(d.doc_id, d.token_ids) for d in iter_documents(settings, TOKENIZER, cursor=document.next_cursor)]
        assert rest == whole[position + 1:]
    cursors = [d.next_cursor for d in documents]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
