"""A run's checkpoints: written whole or not at all, kept step checkpoints, and resumes that refuse another
program's, model's or tokenizer's checkpoint or a damaged one."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_loop import _config, _run_files

from refine.checkpoints import RunPosition, read_trainer_state, resume_from, save_run_checkpoint, step_checkpoints
from refine.config import load_config, run_tokenizer
from refine.loop import prepare_model, train
from refine.models import load_model
from refine.step import make_optimizer


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, capsys):
    stats = train(_config(tmp_path, "ntp", steps=1), resume=True, progress=False)
    assert stats["step"] == 1
    assert f"no checkpoint at {tmp_path / 'checkpoints' / 'latest'} to resume from" in capsys.readouterr().err


def test_checkpoints_carry_the_runs_tokenizer(tmp_path):
    from test_tokenizer import write_bpe_tokenizer

    from refine.tokenizer import load_tokenizer, resolve_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    train(_config(tmp_path / "run", "ntp", steps=1, extra=(f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=320")),
          progress=False)
    model_dir = tmp_path / "run" / "checkpoints" / "latest" / "model"
    # What `refine eval --model` picks without --tokenizer: the run's tokenizer, not the byte fallback.
    found, original = resolve_tokenizer(None, model_dir), load_tokenizer(tmp_path / "tok")
    text = "a document about fast weights"
    assert found.vocab_size == original.vocab_size == 320
    assert found.encode(text) == original.encode(text) and found.eos_id == original.eos_id
    # The model built from scratch took the tokenizer's special ids (no pad token: the model names none).
    saved = load_model(model_dir).config
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (original.bos_id, original.eos_id, None)


def test_a_resume_refuses_a_tokenizer_other_than_the_checkpoints(tmp_path):
    from test_tokenizer import write_bpe_tokenizer

    write_bpe_tokenizer(tmp_path / "tok")
    config = _config(tmp_path / "run", "ntp", steps=1, extra=(f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=320"))
    train(config, progress=False)
    # The tokenizer file rewritten since, its size and special tokens unchanged: two tokens trade ids.
    tree = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = tree["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tree))
    model_dir = tmp_path / "run" / "checkpoints" / "latest" / "model"
    longer = config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})})
    with pytest.raises(ValueError, match=f"--resume: tokenizer '{tmp_path / 'tok'}' is not the one checkpoint "
                                         f"{model_dir.parent} was trained with: resume with the tokenizer saved there "
                                         f"\\(--set tokenizer={model_dir}\\)"):
        train(longer, resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    train(longer.model_copy(update={"tokenizer": str(model_dir)}), resume=True, progress=False)  # the remedy
    # A byte-level run resumed with a tokenizer file is refused alike.
    byte_run = _config(tmp_path / "bytes", "ntp", steps=1, extra=("model.vocab_size=320",))
    train(byte_run, progress=False)
    with pytest.raises(ValueError, match=r"resume with the byte-level tokenizer \(--set tokenizer=byte\)"):
        train(byte_run.model_copy(update={"tokenizer": str(model_dir)}), resume=True, progress=False)


def test_a_resume_refuses_another_dtype_than_the_checkpoints(tmp_path):
    """A bfloat16 run resumed with train.dtype=float32 went on from the rounded model, its optimizer's float32
    master weights (where the run's progress lives) dropped without a word."""
    config = _config(tmp_path / "run", "ntp", steps=1, extra=("train.dtype=bfloat16",))
    train(config, progress=False)
    model_dir = tmp_path / "run" / "checkpoints" / "latest" / "model"
    longer = config.model_copy(update={"train": config.train.model_copy(update={"steps": 2, "dtype": "float32"})})
    with pytest.raises(ValueError, match=f"--resume: train.dtype=float32, but checkpoint {model_dir.parent} was "
                                         f"trained in bfloat16 .*resume with --set train.dtype=bfloat16"):
        train(longer, resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    train(longer.model_copy(update={"train": longer.train.model_copy(update={"dtype": "bfloat16"})}), resume=True,
          progress=False)  # the remedy
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_kept_checkpoints_are_the_newest_ones_hard_linked_and_a_fresh_run_removes_them(tmp_path):
    run = tmp_path / "run"
    keep = ("train.checkpoint_every=1", "train.keep_checkpoints=2")
    train(_config(run, "ntp", steps=3, extra=keep), progress=False)
    folder = run / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    newest = folder / "step-00000003"
    for file in (folder / "latest").rglob("*"):  # the same files as latest, not copies
        if file.is_file():
            assert (newest / file.relative_to(folder / "latest")).stat().st_ino == file.stat().st_ino
    assert read_trainer_state(folder / "step-00000002" / "trainer.pt")["step"] == 2
    older = load_model(folder / "step-00000002" / "model").state_dict()
    assert any(not torch.equal(older[name], tensor) for name, tensor in load_model(newest / "model").state_dict().items())
    # A resume keeps going; a kept checkpoint keeps its step's files after latest moved on.
    train(_config(run, "ntp", steps=5, extra=keep), resume=True, progress=False)
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert read_trainer_state(folder / "step-00000004" / "trainer.pt")["step"] == 4
    assert read_trainer_state(folder / "latest" / "trainer.pt")["step"] == 5
    train(_config(run, "ntp", steps=4, extra=("train.checkpoint_every=4", "train.keep_checkpoints=0")), progress=False)
    assert sorted(path.name for path in folder.iterdir()) == ["latest"]  # a fresh run: the earlier run's are gone


def test_a_kept_checkpoint_the_disk_refuses_names_it_and_leaves_latest_whole(tmp_path, monkeypatch):
    import errno

    import refine.checkpoints

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", destination)

    monkeypatch.setattr(refine.checkpoints, "_link_or_copy", full_disk)
    with pytest.raises(OSError, match=r"cannot keep the step-2 checkpoint as .*step-00000002 \(No space left on "
                                      r"device: .*\): the checkpoint .*latest is intact: `refine train "
                                      rf"{tmp_path / 'config.yaml'} --local --resume` continues from it$"):
        train(_config(tmp_path, "ntp", steps=2, extra=("train.keep_checkpoints=1",)), progress=False)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]
    assert read_trainer_state(tmp_path / "checkpoints" / "latest" / "trainer.pt")["step"] == 2


def test_kept_checkpoints_survive_kills_while_keeping_or_pruning_them(tmp_path, monkeypatch):
    import refine.checkpoints

    keep = ("train.checkpoint_every=1", "train.keep_checkpoints=2")
    # Killed after latest moved to step 2, before step 2 was kept: the resumed run's next save keeps it first.
    real_keep = refine.checkpoints.keep_step_checkpoint

    def killed_at_step_2(latest, position, count):
        if position.step == 2:
            raise KeyboardInterrupt
        real_keep(latest, position, count)

    monkeypatch.setattr(refine.checkpoints, "keep_step_checkpoint", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "ntp", steps=3, extra=keep), progress=False)
    monkeypatch.setattr(refine.checkpoints, "keep_step_checkpoint", real_keep)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000001"]
    train(_config(tmp_path, "ntp", steps=3, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
          resume=True, progress=False)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert read_trainer_state(folder / "step-00000002" / "trainer.pt")["step"] == 2
    # Killed halfway through removing an old one: what is left is no longer under a kept checkpoint's name.
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        if Path(path).name == "step-00000001.removed.partial" and Path(path).exists():
            next(Path(path).rglob("*.safetensors")).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "ntp", steps=4, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
              resume=True, progress=False)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000002", "step-00000003", "step-00000004"]
    train(_config(tmp_path, "ntp", steps=5, extra=("train.checkpoint_every=1", "train.keep_checkpoints=3")),
          resume=True, progress=False)
    assert sorted(path.name for path in folder.iterdir()) == [
        "latest", "step-00000003", "step-00000004", "step-00000005"]  # the .partial leftover removed too


def test_only_the_runs_own_step_folders_are_kept_checkpoints_in_step_order(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-best", "step-00000002-best", "step-123456789", "step-00000007", "step-00000003.partial"):
        (folder / name).mkdir(parents=True)
    assert [path.name for path in step_checkpoints(folder)] == ["step-00000007", "step-123456789"]


def test_a_resume_that_finds_kept_checkpoints_but_no_latest_removes_nothing(tmp_path):
    train(_config(tmp_path, "ntp", steps=2, extra=("train.checkpoint_every=1", "train.keep_checkpoints=2")),
          progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "latest")
    with pytest.raises(ValueError, match=r"--resume: .*latest does not exist, but the kept checkpoints step-00000001, "
                                         r"step-00000002 do; a run starting over would remove them: to continue "
                                         r"from one, rename it to .*checkpoints/latest"):
        train(_config(tmp_path, "ntp", steps=3), resume=True, progress=False)
    assert [path.name for path in step_checkpoints(tmp_path / "checkpoints")] == ["step-00000001", "step-00000002"]


def test_resume_into_another_model_names_the_fields_and_both_values(tmp_path):
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    changed = _config(tmp_path, "ntp", steps=2, extra=("model.hidden_size=64", "model.num_hidden_layers=1"))
    with pytest.raises(ValueError, match=r"was saved from another model \(model\.hidden_size=32 in the checkpoint, "
                                         r"64 in this config; model\.num_hidden_layers=2 in the checkpoint, 1 in "
                                         r"this config\)"):
        train(changed, resume=True, progress=False)


DAMAGED_TRAINER = {
    "garbage": lambda good: bytes(range(256)) * 4,
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not a trainer state": lambda good: _saved([1, 2]),
}


def _saved(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", DAMAGED_TRAINER.values(), ids=DAMAGED_TRAINER.keys())
def test_a_damaged_trainer_state_is_one_line_without_torchs_unsafe_advice(tmp_path, damage):
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    trainer = tmp_path / "checkpoints" / "latest" / "trainer.pt"
    trainer.write_bytes(damage(trainer.read_bytes()))
    before = _run_files(tmp_path)
    with pytest.raises(ValueError, match=f"^{trainer}: not a readable training checkpoint \\(") as failure:
        train(_config(tmp_path, "ntp", steps=2), resume=True, progress=False)
    message = str(failure.value)
    assert "\n" not in message and "weights_only" not in message and failure.value.__cause__ is None
    assert _run_files(tmp_path) == before  # config.yaml (steps=1) not replaced by the failed run's (steps=2)


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    """A run killed while writing its checkpoint keeps the previous one: new weights beside the old optimizer,
    step and data cursor would resume wrongly without a word."""
    config = _config(tmp_path, "ntp")
    model, tokenizer = prepare_model(config), run_tokenizer(config)
    optimizer, generator = make_optimizer(model, config.optim), torch.Generator()
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(2, 4, 1), generator, tokenizer)
    at_step_2 = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    # Fails after the weights and trainer state of step 3 are written.
    with pytest.raises(OSError, match=r"^cannot save the step-3 checkpoint in .*checkpoints \(No such file or "
                                      r"directory: .*no-such-folder/file'\): its partial files are removed; the earlier "
                                      r"checkpoint .*checkpoints/latest is intact$"):  # its caller says how to resume
        save_run_checkpoint(tmp_path, model, optimizer, RunPosition(3, 6, 1), generator, tokenizer,
                            extra_files={"no-such-folder/file": ""})
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]
    resumed = prepare_model(config)
    position = resume_from(tmp_path, True, resumed, make_optimizer(resumed, config.optim), torch.Generator(), "refine",
                           tokenizer)
    assert position == RunPosition(2, 4, 1)  # the step-2 checkpoint, skipped-step count included
    for name, saved in resumed.state_dict().items():
        assert torch.equal(saved, at_step_2[name]), name
    (tmp_path / "checkpoints" / "step-00000003.partial" / "model").mkdir(parents=True)  # what a killed save leaves
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(4, 8, 1), generator, tokenizer)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]


def test_a_ctrl_c_inside_torch_save_stops_as_a_ctrl_c_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save's zip writer turns a Ctrl-C in its write into "RuntimeError: ... unexpected pos": without the
    KeyboardInterrupt restored, a second Ctrl-C during a checkpoint ended `refine train` with exit 1 and a torch
    traceback instead of exit 130 and "refine: interrupted"."""
    import io

    import refine.checkpoints

    config = _config(tmp_path, "ntp")
    model, tokenizer = prepare_model(config), run_tokenizer(config)
    optimizer, generator = make_optimizer(model, config.optim), torch.Generator()
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(2, 4, 1), generator, tokenizer)

    class CtrlCWhileWriting(io.FileIO):
        writes = 0

        def write(self, data) -> int:
            CtrlCWhileWriting.writes += 1
            if CtrlCWhileWriting.writes == 3:  # in the middle of trainer.pt, as a signal handler raises it
                raise KeyboardInterrupt
            return super().write(data)

    monkeypatch.setattr(refine.checkpoints, "open", CtrlCWhileWriting, raising=False)  # save_checkpoint's open
    with pytest.raises(KeyboardInterrupt) as stopped:
        save_run_checkpoint(tmp_path, model, optimizer, RunPosition(3, 6, 1), generator, tokenizer)
    assert type(stopped.value) is KeyboardInterrupt
    assert isinstance(stopped.value.__cause__, RuntimeError)  # torch did convert it: what the fix undoes
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest"]
    monkeypatch.undo()
    resumed = prepare_model(config)
    assert resume_from(tmp_path, True, resumed, make_optimizer(resumed, config.optim), torch.Generator(), "refine",
                       tokenizer) == RunPosition(2, 4, 1)


def test_a_resume_trains_with_the_configs_optimizer_settings_and_the_checkpoints_moments(tmp_path):
    """config.yaml says what the resumed run trains with: a lower lr given at resume is the one used."""
    train(_config(tmp_path, "ntp", steps=2, extra=("optim.lr=0.01",)), progress=False)
    config = _config(tmp_path, "ntp", steps=3, extra=("optim.lr=1e-5", "optim.weight_decay=0.5"))
    model = prepare_model(config)
    optimizer = make_optimizer(model, config.optim)
    assert resume_from(tmp_path, True, model, optimizer, torch.Generator(), "refine", run_tokenizer(config)).step == 2
    assert {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups} == {(1e-5, 0.5)}
    saved = torch.load(tmp_path / "checkpoints" / "latest" / "trainer.pt", weights_only=True)["optimizer"]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_a_resume_refuses_a_checkpoint_another_program_wrote(tmp_path):
    """`refine posttrain --resume` over a `refine train` run (or the reverse) would count its data cursor in other
    records and splice its rows into the other run's metrics.jsonl. The checkpoint says which program wrote it:
    a run record left behind in the directory does not decide."""
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    config = _config(tmp_path, "ntp", steps=2)
    model = prepare_model(config)

    def resume(program):
        return resume_from(tmp_path, True, model, make_optimizer(model, config.optim), torch.Generator(), program,
                           run_tokenizer(config))

    checkpoint = tmp_path / "checkpoints" / "latest"
    (tmp_path / "posttrain.json").write_text("{}")  # a stale record beside the train run's own
    with pytest.raises(ValueError) as refused:
        resume("refine posttrain")
    assert str(refused.value).startswith(
        f"train.out_dir={str(tmp_path)!r} holds a `refine train` run (its checkpoint {checkpoint} was written by "
        f"`refine train`): `refine posttrain --resume` continues only runs of `refine posttrain`")
    assert resume("refine") == RunPosition(1, 2, 0, "refine")

    tokenizer, generator = run_tokenizer(config), torch.Generator()
    save_run_checkpoint(tmp_path, model, make_optimizer(model, config.optim), RunPosition(3, 6, 0, "refine posttrain"),
                        generator, tokenizer)
    (tmp_path / "posttrain.json").unlink()  # only the train run's record is left: still a posttrain checkpoint
    with pytest.raises(ValueError, match="holds a `refine posttrain` run .*: `refine train --resume` continues only "
                                         "runs of `refine train`"):
        resume("refine")
    assert resume("refine posttrain") == RunPosition(3, 6, 0, "refine posttrain")


def test_a_checkpoint_that_names_no_program_is_judged_by_the_run_records(tmp_path):
    """Checkpoints written before they named their program: the directory's run records decide, and a directory
    that holds both programs' records (a fresh run left the other's behind) resumes neither."""
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    (tmp_path / "checkpoints" / "latest" / "program.json").unlink(missing_ok=True)  # as such a checkpoint
    config = _config(tmp_path, "ntp", steps=2)
    model = prepare_model(config)

    def resume(program):
        return resume_from(tmp_path, True, model, make_optimizer(model, config.optim), torch.Generator(), program,
                           run_tokenizer(config))

    with pytest.raises(ValueError, match="holds the run record of `refine train` \\(data_source.json\\)"):
        resume("refine posttrain")
    assert resume("refine").step == 1
    (tmp_path / "posttrain.json").write_text("{}")
    for program in ("refine", "refine posttrain"):
        with pytest.raises(ValueError, match="holds the run record of `refine train` \\(data_source.json\\) and "
                                             "`refine posttrain` \\(posttrain.json\\), and its checkpoint .* does "
                                             "not name the program that wrote it"):
            resume(program)


def test_a_checkpoint_is_on_disk_before_it_is_published_and_before_the_previous_one_goes(tmp_path, monkeypatch):
    """A machine crash (not only a killed process) must leave a whole checkpoint: every file and directory of the
    new one is fsynced before the rename that publishes it, and checkpoints/ after that rename, while the
    previous checkpoint still exists."""
    config = _config(tmp_path, "ntp")
    model, tokenizer = prepare_model(config), run_tokenizer(config)
    optimizer, generator = make_optimizer(model, config.optim), torch.Generator()
    folder = tmp_path / "checkpoints"
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(1, 2, 0), generator, tokenizer)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", path, (folder / "previous").exists()))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_run_checkpoint(tmp_path, model, optimizer, RunPosition(2, 4, 0), generator, tokenizer,
                        extra_files={"learner_state.json": "{}"})
    staging = folder / "step-00000002.partial"
    publish = events.index(("replace", staging, folder / "latest"))
    synced_before = {event[1] for event in events[:publish] if event[0] == "fsync"}
    latest = folder / "latest"
    written = {staging / path.relative_to(latest) for path in latest.rglob("*")} | {staging}
    assert {"trainer.pt", "learner_state.json", "model/model.safetensors", "model/config.json"} <= {
        str(path.relative_to(latest)) for path in latest.rglob("*")}
    assert written <= synced_before, sorted(written - synced_before)
    after = [event for event in events[publish + 1:] if event[0] == "fsync"]
    assert ("fsync", folder, True) in after  # the rename on disk while the previous checkpoint is still there
    assert not (folder / "previous").exists()


def test_a_run_may_not_start_from_a_model_in_its_own_checkpoints_folder(tmp_path):
    """A fresh run empties its checkpoints folder: a run started from its own checkpoints/latest/model deleted the
    model it started from, and a killed first attempt could then not be started again."""
    train(_config(tmp_path / "run", "ntp", steps=1), progress=False)
    model = tmp_path / "run" / "checkpoints" / "latest" / "model"
    before = sorted(path.name for path in model.iterdir())
    config = _config(tmp_path / "run", "ntp", steps=1)
    for field, starting_from in (("train.init_from", config.model_copy(update={
            "train": config.train.model_copy(update={"init_from": str(model)})})),
            ("tokenizer", config.model_copy(update={"tokenizer": str(model)}))):
        with pytest.raises(ValueError, match=rf"^{field}='{model}' lies in this run's own checkpoints folder "
                                             rf"'{tmp_path / 'run' / 'checkpoints'}'"):
            train(starting_from, progress=False)
        assert sorted(path.name for path in model.iterdir()) == before
    # The same model copied out of the run's folder is a model to start from.
    shutil.copytree(model, tmp_path / "start")
    train(config.model_copy(update={"train": config.train.model_copy(update={"init_from": str(tmp_path / "start")})}),
          progress=False)


def test_a_run_whose_starting_model_is_gone_names_the_resume_that_continues_it(tmp_path, monkeypatch, capsys):
    """A run moved to another machine, or whose base download was deleted: its config.yaml still names the model it
    started from, which a --resume reads (config.json, tokenizer). The error says how to continue without it."""
    from refine.cli import main

    train(_config(tmp_path / "base", "ntp", steps=1), progress=False)
    shutil.copytree(tmp_path / "base" / "checkpoints" / "latest" / "model", tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    train(load_config(None, ["train.init_from=start", "train.out_dir=run", "train.mode=ntp", "train.steps=1",
                             "train.batch_size=2", "data.seq_len=256", "data.num_documents=8"]), progress=False)
    shutil.rmtree(tmp_path / "start")
    model = Path("run") / "checkpoints" / "latest" / "model"
    assert main(["train", "run/config.yaml", "--local", "--resume", "--no-progress", "--set", "train.steps=2"]) == 2
    error = capsys.readouterr().err
    assert ("train.init_from='start' does not exist: a --resume of the run in train.out_dir='run' reads its starting "
            "checkpoint's config.json and tokenizer") in error
    assert error.rstrip().endswith(f"--set train.init_from={model}")
    assert main(["train", "run/config.yaml", "--local", "--resume", "--no-progress", "--set", "train.steps=2",
                 "--set", f"train.init_from={model}"]) == 0
    assert read_trainer_state(tmp_path / "run" / "checkpoints" / "latest" / "trainer.pt")["step"] == 2


def test_a_refused_write_names_the_command_that_resumes_the_run(tmp_path):
    """The messages said `refine train --resume`, which runs the main job (a --local run, a service run from its
    config, posttrain need their own command line): the command running the run adds its own."""
    from refine.checkpoints import RunWriteError, kept_checkpoint, resume_command_named

    command = ["refine", "train", str(tmp_path / "config.yaml"), "--resume"]
    with pytest.raises(RunWriteError) as error, resume_command_named(tmp_path, command):
        raise RunWriteError(f"cannot write a row: {kept_checkpoint(tmp_path)}")
    assert str(error.value) == (f"cannot write a row: the run has no earlier checkpoint: "
                                f"`refine train {tmp_path / 'config.yaml'} --resume` starts it over")
    train(_config(tmp_path, "ntp", steps=1), progress=False)
    with pytest.raises(RunWriteError) as error, resume_command_named(tmp_path, command):
        raise RunWriteError(f"cannot write a row: {kept_checkpoint(tmp_path)}")
    assert str(error.value).endswith(f"the earlier checkpoint {tmp_path / 'checkpoints' / 'latest'} is intact: "
                                     f"`refine train {tmp_path / 'config.yaml'} --resume` continues from it")
    with pytest.raises(OSError, match="^other$"), resume_command_named(tmp_path, command):
        raise OSError("other")  # not a run's write: left as it is


def test_a_run_directory_given_as_a_model_is_pointed_to_its_model(tmp_path):
    """`refine model inspect RUN` and `refine eval --model RUN` said only that RUN/config.json does not exist."""
    from refine.models import load_model_config

    train(_config(tmp_path, "ntp", steps=1), progress=False)
    model = tmp_path / "checkpoints" / "latest" / "model"
    with pytest.raises(FileNotFoundError, match=rf"config.json does not exist: a model directory needs config.json "
                                                rf"\(a run directory: its model is {model}\)$"):
        load_model_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"needs config.json$"):  # no hint where there is no run
        load_model_config(tmp_path / "checkpoints")
    assert load_model_config(model).vocab_size > 0
