"""A learner checkpoint's own files (learner_state.json, reports.jsonl) damaged on disk: one line naming the file
(and the line), never pydantic's many-line report or a bare JSON error that names no file."""

import json

import pytest

from learner.checkpoint import read_checkpoint_reports, read_learner_state

DAMAGED_STATES = {
    "cut short": ('{"step": ', "the file: Invalid JSON: EOF while parsing a value at line 1 column 9"),
    "empty": ("", "the file: Invalid JSON: EOF while parsing a value at line 1 column 0"),
    "not an object": ("[]", "the file: Input should be an object (got [])"),
    "a negative step": ('{"step": -1}', "step: Input should be greater than or equal to 0 (got -1)"),
    "not UTF-8": (b"\xff\xfe", "the file: Invalid JSON: expected value at line 1 column 1"),
}


@pytest.mark.parametrize("text, problem", DAMAGED_STATES.values(), ids=DAMAGED_STATES.keys())
def test_a_damaged_learner_state_is_one_line_naming_the_file(tmp_path, text, problem):
    state_file = tmp_path / "learner_state.json"
    state_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as failure:
        read_learner_state(tmp_path)
    message = str(failure.value)
    assert message.startswith(f"{state_file}: not a readable learner state ({problem}")
    assert "\n" not in message and "errors.pydantic.dev" not in message and failure.value.__cause__ is None


GOOD_REPORT = {"kind": "step", "step": 1, "seq": 1, "stats": {"step": 1, "loss": 2.0}}
DAMAGED_REPORTS = {
    "cut short": ('{"kind": ', "Expecting value: line 1 column 10 (char 9)"),
    "not an object": ("[1]", "the line: Input should be an object (got [1])"),
    "a report without its step": ('{"kind": "step", "seq": 2}', "step: Field required"),
}


@pytest.mark.parametrize("line, problem", DAMAGED_REPORTS.values(), ids=DAMAGED_REPORTS.keys())
def test_a_damaged_report_is_one_line_naming_the_file_and_the_line(tmp_path, line, problem):
    reports_file = tmp_path / "reports.jsonl"
    reports_file.write_text(json.dumps(GOOD_REPORT) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as failure:
        read_checkpoint_reports(tmp_path)
    message = str(failure.value)
    assert message.startswith(f"{reports_file} line 3: not a readable report ({problem}")
    assert "\n" not in message and failure.value.__cause__ is None
