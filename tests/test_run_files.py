"""A run directory's files: config.yaml, one metrics.jsonl row per step across reruns and resumes, what a fresh
run removes, and rows that cannot be written."""

import json
from pathlib import Path

import pytest
from test_loop import _config

from refine.loop import train
from refine.run_files import start_run_directory


def test_a_resume_with_nothing_left_to_train_says_so_and_leaves_the_run_as_it_was(tmp_path, capsys):
    train(_config(tmp_path, "ntp", steps=2), progress=False)
    before = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    stats = train(_config(tmp_path, "ntp", steps=1), resume=True, progress=False)
    assert stats["step"] == 2 and stats == json.loads(before["metrics.jsonl"].splitlines()[-1])
    assert f"nothing to train: the checkpoint in {tmp_path} is at step 2, train.steps=1" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_text() for name in before} == before  # config.yaml still says 2 steps


def test_metrics_rows_are_one_per_step_across_reruns_and_resumes(tmp_path):
    config = _config(tmp_path, "ntp", steps=2)
    train(config, progress=False)
    train(config, progress=False)  # the same command again, without --resume: a fresh run
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A run killed after logging step 3 but before a checkpoint there resumes from step 2: step 3's row goes.
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 3, "loss": 9.9}) + "\n" + '{"step": 4, "lo')
    train(_config(tmp_path, "ntp", steps=4), resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 9.9


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_an_out_dir_that_cannot_be_a_directory_names_the_field(tmp_path, where):
    (tmp_path / "file").write_text("keep me")
    out_dir = tmp_path / where
    with pytest.raises(ValueError, match=f"^train.out_dir='{out_dir}': cannot create the run directory"):
        train(_config(out_dir, "ntp", steps=1), progress=False)
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_fresh_run_removes_the_earlier_runs_checkpoint(tmp_path, capsys):
    """Else a --resume after the fresh run died before its first checkpoint would continue the earlier run."""
    train(_config(tmp_path, "ntp", steps=2), progress=False)
    capsys.readouterr()
    config = _config(tmp_path, "ntp", steps=1)
    start_run_directory(config, fresh=False, program="refine")
    assert (tmp_path / "checkpoints" / "latest").is_dir()  # a resumed run keeps it
    (tmp_path / "checkpoints" / "step-00000009.partial").mkdir()  # a save the earlier run did not finish
    (tmp_path / "eval-niah.json").write_text("{}")  # refine eval's results for the earlier run's checkpoint
    start_run_directory(config, fresh=True, program="refine")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert (f"a fresh run in {tmp_path}: removed the earlier run's checkpoints (--resume continues a run); the "
            f"earlier run's eval results stay (eval-niah.json): they score its checkpoints, not this run's"
            ) in capsys.readouterr().err
    assert (tmp_path / "eval-niah.json").exists()


def test_a_fresh_run_removes_the_other_programs_run_record(tmp_path):
    """A fresh run's directory says whose run it holds: the other program's record goes with the checkpoint."""
    config = _config(tmp_path, "ntp", steps=1)
    for record in ("data_source.json", "posttrain.json"):
        (tmp_path / record).write_text("{}")
    start_run_directory(config, fresh=False, program="refine")  # a resumed run touches neither
    assert (tmp_path / "data_source.json").exists() and (tmp_path / "posttrain.json").exists()
    start_run_directory(config, fresh=True, program="refine")
    assert (tmp_path / "data_source.json").exists() and not (tmp_path / "posttrain.json").exists()
    (tmp_path / "posttrain.json").write_text("{}")
    start_run_directory(config, fresh=True, program="refine posttrain")
    assert not (tmp_path / "data_source.json").exists() and (tmp_path / "posttrain.json").exists()


def test_a_row_that_cannot_be_written_names_its_file(tmp_path: Path) -> None:
    """metrics.jsonl and events.jsonl (the service's driver writes both the same way): a refused row names the
    file and the cause, and a file gone with its run directory says so."""
    from refine.run_files import write_row

    events = tmp_path / "events.jsonl"
    events.mkdir()  # any write refused by the file system
    with pytest.raises(OSError, match=r"^cannot write a row to .*events\.jsonl \(Is a directory\): the run stops; "
                                      r"the run has no earlier checkpoint$"):  # the command running it says how to go on
        write_row(events, {"event": "restart"}, "refine")
    metrics = tmp_path / "metrics.jsonl"
    metrics.mkdir()
    with pytest.raises(OSError, match=r"^cannot write step 7's row to .*metrics\.jsonl"):
        write_row(metrics, {"step": 7}, "refine")
    with pytest.raises(OSError, match=r"its events\.jsonl is gone \(the run directory was removed or moved"):
        write_row(tmp_path / "removed" / "events.jsonl", {"event": "restart"}, "refine")


def test_a_resume_keeps_the_same_metrics_file_unless_rows_go(tmp_path):
    """A resume replaced metrics.jsonl even when it dropped no row: a `tail -f` started before it saw nothing
    more (it follows the replaced file)."""
    from refine.run_files import restart_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    inode = path.stat().st_ino
    restart_metrics(path, 2)
    assert path.stat().st_ino == inode and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    restart_metrics(path, 1)  # the rows after the checkpoint are redone: dropped, the file replaced whole
    assert path.read_text() == '{"step": 1}\n'
    path.write_text('{"step": 1}\n{"step": 2')  # a row a killed run cut short
    restart_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n'
    restart_metrics(path, 0)
    assert path.read_text() == ""


def _documents(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"document {i} " * 60}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("field", ["data.source", "data.eval_source"])
@pytest.mark.parametrize("name", ["metrics.jsonl", "events.jsonl", "checkpoints/latest/docs.jsonl"])
def test_data_that_the_run_writes_is_refused_fresh_or_resumed_and_left_as_it_was(tmp_path, field, name):
    """A fresh run whose data.source was its own run directory's metrics.jsonl (copied there to look at, or a
    finished run's folder reused) trained on it, then overwrote it with its own rows: exit 0, the data gone."""
    data = _documents(tmp_path / "run" / name)
    before = data.read_bytes()
    config = _config(tmp_path / "run", "ntp", steps=1, extra=(f"{field}={data}",))
    for resume in (False, True):
        with pytest.raises(ValueError, match=rf"^{field}='{data}' is a file that this run writes \(train.out_dir="
                                             rf"'{tmp_path / 'run'}'\): copy it out of the run directory first"):
            train(config, resume=resume, progress=False)
    assert data.read_bytes() == before and not (tmp_path / "run" / "config.yaml").exists()


def test_a_data_folder_that_holds_the_run_directory_is_refused_unless_hidden_from_the_data(tmp_path):
    """A run in a folder of data.source read its own metrics.jsonl as documents once it existed, and stopped on its
    first row ("column 'text' missing"), or, with data.skip_bad_rows, skipped more of them every pass."""
    _documents(tmp_path / "data" / "docs.jsonl")
    for out_dir in (tmp_path / "data" / "runs" / "a", tmp_path / "data"):
        with pytest.raises(ValueError, match=rf"^data.source='{tmp_path / 'data'}' is a folder that holds "
                                             rf"train.out_dir='{out_dir}': the run's own files \(metrics.jsonl, "
                                             rf"events.jsonl\) would be read as documents"):
            train(_config(out_dir, "ntp", steps=1, extra=(f"data.source={tmp_path / 'data'}",)), progress=False)
    hidden = tmp_path / "data" / ".runs" / "a"  # the data layer leaves hidden folders out
    train(_config(hidden, "ntp", steps=1, extra=(f"data.source={tmp_path / 'data'}",)), progress=False)
    assert (hidden / "metrics.jsonl").exists()
    # The run's own files beside, not inside, its data are fine: a sibling folder.
    sibling = tmp_path / "runs" / "b"
    train(_config(sibling, "ntp", steps=1, extra=(f"data.source={tmp_path / 'data'}",)), progress=False)
