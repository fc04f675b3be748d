"""The byte tokenizer, task rows and `refine eval` caller shared by the evaluation tests."""

import json
from pathlib import Path

from refine.cli import main as cli_main
from refine.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()

RULER_ROWS = [  # the REFINE release's RULER QA rows, then RULER's own output format
    {"prompt": "Answer the question based on the documents.\nDocument 1: The capital of Norway is Oslo, a harbor "
               "city.\nDocument 2: Bergen has rain.\nQuestion: What is the capital of Norway?\nAnswer:",
     "answer": ["Oslo"], "max_gen_tokens": 3, "max_answer_length": 1, "task": "ruler_squadqa"},
    {"index": 7, "input": "Document 1: The river Tana runs north to the Arctic sea past birch forests.\n"
                          "Question: Where does the Tana run?", "outputs": ["north", "the Arctic sea"],
     "answer_prefix": " Answer:", "length": 120},
]
LONGBENCH_ROWS = [  # LongBench's released rows: two datasets in one file
    {"input": "Which city hosts the lighthouse museum?", "context": "Passage 1: The lighthouse museum stands in "
     "Vardo, near the old fort. Passage 2: The fort was rebuilt twice.", "answers": ["Vardo"], "length": 21,
     "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "hq-1"},
    {"input": "What is the capital of Peru?", "context": "Question: Who wrote Hamlet?\nType: Human\n"
     "Question: How far is the Moon?\nType: Number", "answers": ["Location"], "length": 17,
     "dataset": "trec", "language": "en", "all_classes": ["Human", "Number", "Location", "Entity"], "_id": "tr-1"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_eval(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli_main(["eval", *argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    return code, (json.loads(lines[-1]) if lines else None), captured.err
