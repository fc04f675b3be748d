"""A disk that refuses a run's writes (full, a file size limit, the run directory gone): one line naming the file,
the cause and the checkpoint kept; no half-written file left; `--resume` continues from the earlier checkpoint.

The real cases run the CLI in a subprocess under RLIMIT_FSIZE (SIGXFSZ ignored, so that a write past the limit
fails with EFBIG as one on a full disk fails with ENOSPC)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import refine.loop
from refine.cli import main
from refine.config import load_config
from refine.loop import train
from refine.models import build_model, save_model

SMALL = """\
model: {model_type: delta_net, vocab_size: 260, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
        num_heads: 2, pad_token_id: 256, bos_token_id: 257, eos_token_id: 258}
data: {source: synthetic, seq_len: 256, num_documents: 8, synthetic_tasks: [recall]}
train: {mode: ntp, batch_size: 2, steps: 1, checkpoint_every: 0}
optim: {lr: 0.001}
"""

LIMITED = """\
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from refine.cli import main
sys.exit(main(sys.argv[2:]))
"""

needs_file_size_limit = pytest.mark.skipif(
    not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")


def _refine(argv: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    """`refine ARGV`; with a `limit`, in a subprocess that may write no file larger than `limit` bytes (else in
    this process: a subprocess costs seconds of imports)."""
    if limit is None:
        return subprocess.CompletedProcess(argv, main(argv), "", "")
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


def _train(config: Path, out: Path, steps: int, limit: int | None = None,
           resume: bool = True) -> subprocess.CompletedProcess:
    argv = ["train", str(config), "--local", "--no-progress", "--set", f"train.out_dir={out}",
            "--set", f"train.steps={steps}"]
    return _refine(argv + (["--resume"] if resume else []), limit)


def _trained_run(tmp_path: Path, steps: int) -> tuple[Path, Path]:
    """(config, run directory) of a fresh run of SMALL trained `steps` steps, with nothing limited."""
    config = tmp_path / "small.yaml"
    config.write_text(SMALL)
    out = tmp_path / "run"
    assert _train(config, out, steps, resume=False).returncode == 0
    return config, out


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refine: error: "), result.stderr
    return lines[0]


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")  # no half row
    return [json.loads(line) for line in text.splitlines()]


@needs_file_size_limit
@pytest.mark.parametrize("file", ["model.safetensors", "trainer.pt"])
def test_a_checkpoint_the_disk_refuses_is_one_line_and_the_earlier_one_resumes(tmp_path, file):
    """safetensors said "Error while serializing: I/O error" in a traceback, torch.save "unexpected pos 8383424 vs
    8383316"; the half-written checkpoint stayed, as large as a whole one, and on a full disk kept even the
    --resume from starting."""
    config, out = _trained_run(tmp_path, 1)
    latest = out / "checkpoints" / "latest"
    before = {path.name: path.read_bytes() for path in latest.rglob("*") if path.is_file()}
    # Room for config.yaml and the rows, not for this one file of the checkpoint.
    limit = {"model.safetensors": 20_000, "trainer.pt": (latest / "model" / "model.safetensors").stat().st_size + 1000}
    error = _one_line_error(_train(config, out, 2, limit=limit[file]))
    assert error == (f"refine: error: cannot save the step-2 checkpoint in {out / 'checkpoints'} (File too large): "
                     f"its partial files are removed; the earlier checkpoint {latest} is intact: `refine train "
                     f"{out / 'config.yaml'} --local --resume` continues from it")
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["latest"]
    assert {path.name: path.read_bytes() for path in latest.rglob("*") if path.is_file()} == before
    assert _train(config, out, 2).returncode == 0
    assert [row["step"] for row in _rows(out / "metrics.jsonl")] == [1, 2]


@needs_file_size_limit
def test_a_metrics_row_the_disk_refuses_stops_the_run_without_a_half_row(tmp_path):
    """It was a bare "[Errno 27] File too large" and a half row at the end of metrics.jsonl."""
    config, out = _trained_run(tmp_path, 1)
    limit = (out / "config.yaml").stat().st_size + 200  # room for config.yaml and a few rows
    error = _one_line_error(_train(config, out, 30, limit=limit))
    assert error.startswith("refine: error: cannot write step ")
    assert error.endswith(f"'s row to {out / 'metrics.jsonl'} (File too large): the run stops; the earlier "
                          f"checkpoint {out / 'checkpoints' / 'latest'} is intact: `refine train "
                          f"{out / 'config.yaml'} --local --resume` continues from it")
    rows = _rows(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1)) and len(rows) > 1
    assert _train(config, out, 3).returncode == 0
    assert [row["step"] for row in _rows(out / "metrics.jsonl")] == [1, 2, 3]


@needs_file_size_limit
def test_a_resume_whose_metrics_rewrite_the_disk_refuses_keeps_every_row(tmp_path):
    """A resume rewrites metrics.jsonl (the rows up to its checkpoint): the plain rewrite emptied the file first,
    so a full disk lost the run's rows."""
    config, out = _trained_run(tmp_path, 12)
    # A row logged after the checkpoint (a run killed before its next one): the resume drops it, rewriting the file.
    with (out / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"step": 13, "loss": 1.0}) + "\n")
    metrics = (out / "metrics.jsonl").read_text()
    limit = (out / "config.yaml").stat().st_size + 100
    assert len(metrics) > limit
    error = _one_line_error(_train(config, out, 13, limit=limit))
    assert error == f"refine: error: [Errno 27] File too large: '{out / 'metrics.jsonl'}'"
    assert (out / "metrics.jsonl").read_text() == metrics
    assert not list(out.glob(".*.tmp"))


@needs_file_size_limit
def test_a_config_the_disk_refuses_names_the_file(tmp_path):
    config, out = _trained_run(tmp_path, 1)
    written = (out / "config.yaml").read_text()
    error = _one_line_error(_train(config, out, 2, limit=1000))
    assert error == f"refine: error: [Errno 27] File too large: '{out / 'config.yaml'}'"
    assert (out / "config.yaml").read_text() == written and not list(out.glob(".*.tmp"))


def _small_model(path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1,
                                       vocab_size=260, intermediate_size=32, pad_token_id=256, bos_token_id=257,
                                       eos_token_id=258)), path)  # the byte tokenizer's special ids


@needs_file_size_limit
def test_a_posttrain_checkpoint_the_disk_refuses_names_its_own_resume(tmp_path):
    init = _small_model(tmp_path / "init")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Record {i}: the keeper is Ada{i}. " * 3 + "Who keeps it?",
                                        "answer": [f"Ada{i}"]}) + "\n" for i in range(3)))
    out = tmp_path / "run"

    def posttrain(steps: int, limit: int | None = None) -> subprocess.CompletedProcess:
        sets = [f"train.init_from={init}", f"train.out_dir={out}", f"train.steps={steps}", "train.batch_size=2",
                "refine.num_chunks=2", "refine.rollout_len=3", "refine.margin=4"]
        argv = ["posttrain", "--data", str(data), "--task", "ruler-qa", "--no-progress", "--resume"]
        return _refine(argv + [item for pair in (("--set", item) for item in sets) for item in pair], limit)

    assert posttrain(1).returncode == 0
    error = _one_line_error(posttrain(2, limit=20_000))
    latest = out / "checkpoints" / "latest"
    assert error == (f"refine: error: cannot save the step-2 checkpoint in {out / 'checkpoints'} (File too large): "
                     f"its partial files are removed; the earlier checkpoint {latest} is intact: `refine posttrain "
                     f"--data {data} --task ruler-qa --config {out / 'config.yaml'} --resume` continues from it")
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["latest"]
    assert torch.load(latest / "trainer.pt", weights_only=True)["step"] == 1
    assert posttrain(2).returncode == 0
    assert [row["step"] for row in _rows(out / "metrics.jsonl")] == [1, 2]


@needs_file_size_limit
def test_eval_results_the_disk_refuses_name_the_file_and_keep_the_score(tmp_path):
    model = _small_model(tmp_path / "model")
    output = tmp_path / "results.json"
    output.write_text("earlier")
    result = _refine(["eval", "--model", str(model), "--task", "niah", "--num-examples", "2", "--length", "384",
                      "--max-new-tokens", "4", "--no-progress", "--output", str(output)], limit=300)
    error = _one_line_error(result)
    assert error == (f"refine: error: [Errno 27] File too large: '{output}': the results of 2 examples were not "
                     f"written (the summary line above has their score); rerun once the file can be written, or "
                     f"with another --output")
    summary = json.loads(result.stdout)
    assert summary["num_examples"] == 2 and "score" in summary and summary["output"] is None
    assert output.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]


def _config(tmp_path: Path, steps: int, *extra: str):
    return load_config(None, [f"train.out_dir={tmp_path}", "train.mode=ntp", f"train.steps={steps}",
                              "train.batch_size=2", "data.seq_len=256", "data.num_documents=8", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.vocab_size=260", "optim.lr=1e-3", *extra])


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_run_directory_removed_during_the_run_stops_it_rather_than_be_made_anew(tmp_path, monkeypatch, log_every):
    """The run went on writing rows into the deleted metrics.jsonl, made the directory anew for its checkpoint
    (without config.yaml or a row) and reported success."""
    out = tmp_path / "run"
    steps_taken = []
    train_step = refine.loop.train_step

    def removing_the_directory(*args, **kwargs):
        steps_taken.append(1)
        if len(steps_taken) == 2:
            shutil.rmtree(out)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(refine.loop, "train_step", removing_the_directory)
    config = _config(out, 4, "train.checkpoint_every=2", f"train.log_every={log_every}")
    with pytest.raises(OSError, match=f"^train.out_dir='{out}': its metrics.jsonl is gone \\(the run directory was "
                                      f"removed or moved during the run\\): `refine train` stops rather than write its "
                                      f"checkpoint into a new directory$"):
        train(config, progress=False)
    assert not out.exists()


def test_plots_the_disk_refuses_are_a_warning_naming_the_file_after_a_complete_run(tmp_path, monkeypatch, capsys):
    """The run's checkpoint and rows were written; a full disk at the plots failed it with "[Errno 28] No space
    left on device", naming no file."""
    def full_disk(self, path, **kwargs):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "run"
    stats = train(_config(out, 2), progress=False)
    assert stats["step"] == 2
    assert (out / "checkpoints" / "latest" / "trainer.pt").is_file()
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    assert warning == (f"train[ntp]: warning: the plots were not written ([Errno 28] No space left on device: "
                       f"'{out / 'losses.png'}'); the run's checkpoint and metrics.jsonl are complete")
