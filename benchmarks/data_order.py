"""Reading a source shuffled (`data.shuffle=true`) against reading it in order.

Writes a corpus of `--records` texts of about `--chars` characters as one JSON-lines file and one parquet file
(row groups of `--row-group` rows) in a temporary folder, then for each format prints one JSON object: the
seconds to index the source (a JSON-lines file is read once to find where its records start; parquet's footers
hold its row counts), records per second read in the source's order and shuffled, and tokenized documents per
second through the data stream (byte tokenizer) both ways, with the shuffled / in-order ratios, medians over
`--repeats` interleaved rounds. The files are read from the page cache: a cold disk makes a shuffled JSON-lines
read seek for every record.

    python benchmarks/data_order.py [--records 50000] [--chars 2000] [--row-group 1000] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from refine.cli import positive_int
from refine.data.documents import DocumentStream
from refine.data.readers import RowSource, _jsonl_records
from refine.data.sources import DataConfig
from refine.runtime import sigterm_as_ctrl_c
from refine.tokenizer import ByteTokenizer


def write_corpus(folder: Path, records: int, chars: int, row_group: int) -> dict[str, Path]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    texts = []
    for index in range(records):
        text = f"record {index}:"
        while len(text) < chars:
            text += " " + rng.choice(words)
        texts.append(text)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    parquet = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=row_group)
    return {"jsonl": jsonl, "parquet": parquet}


def records_per_second(path: Path, shuffled: bool) -> float:
    source = RowSource(path, columns=["text"])
    start = time.perf_counter()
    count = sum(1 for _ in (source.shuffled_rows(seed=1) if shuffled else source.rows()))
    return count / (time.perf_counter() - start)


def documents_per_second(path: Path, shuffled: bool) -> float:
    config = DataConfig(path=str(path), max_length=512, shuffle_seed=1 if shuffled else None, show_progress=False)
    start = time.perf_counter()
    count = sum(1 for _ in DocumentStream(config, ByteTokenizer()).iter_from(0))
    return count / (time.perf_counter() - start)


def measure(fmt: str, path: Path, repeats: int) -> dict:
    _jsonl_records.cache_clear()
    start = time.perf_counter()
    count = RowSource(path, columns=["text"]).record_count()
    index_seconds = time.perf_counter() - start
    ratios: dict[str, list[float]] = {"records": [], "documents": []}
    rates: dict[str, list[float]] = {key: [] for key in ("records_in_order", "records_shuffled",
                                                         "documents_in_order", "documents_shuffled")}
    for _ in range(repeats):  # interleaved, so that the machine's noise falls on both orders alike
        for kind, rate in (("records", records_per_second), ("documents", documents_per_second)):
            in_order, shuffled = rate(path, False), rate(path, True)
            rates[f"{kind}_in_order"].append(in_order)
            rates[f"{kind}_shuffled"].append(shuffled)
            ratios[kind].append(shuffled / in_order)
    return {
        "format": fmt, "records": count, "file_bytes": path.stat().st_size, "index_seconds": round(index_seconds, 4),
        **{f"{key}_per_second": round(statistics.median(values), 1) for key, values in rates.items()},
        "records_shuffled_over_in_order": round(statistics.median(ratios["records"]), 3),
        "documents_shuffled_over_in_order": round(statistics.median(ratios["documents"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=positive_int, default=50_000)
    parser.add_argument("--chars", type=positive_int, default=2000)
    parser.add_argument("--row-group", type=positive_int, default=1000)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="refine-data-order-") as folder:
        for fmt, path in write_corpus(Path(folder), args.records, args.chars, args.row_group).items():
            print(json.dumps(measure(fmt, path, args.repeats)), flush=True)


if __name__ == "__main__":
    with sigterm_as_ctrl_c():  # a stopped benchmark still removes its temporary files and child processes
        main()
