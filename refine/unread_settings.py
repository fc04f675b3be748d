"""Settings given with `--set` that a training run will not read, each with what leaves it unread.

`refine train` warns about them: a value typed on the command line and then ignored (`data.num_documents` with
a file as the source, `refine.*` for next-token prediction only, `service.*` in a single process) looks like it
took effect. Settings a config file holds are not named: an example config carries fields for several uses.
"""

from __future__ import annotations

from collections.abc import Iterable

from refine.config import RunConfig

SYNTHETIC_ONLY = ("data.num_documents", "data.synthetic_tasks")  # the synthetic corpus's settings
FILE_ONLY = ("data.format", "data.text_column", "data.skip_bad_rows")  # a data file's (data.source or eval_source)


def _in_section(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def why_unread(config: RunConfig, key: str, in_process: str | None) -> str | None:
    """What leaves setting `key` (as given to --set) unread in a run of `config`, or None when the run reads it.
    `in_process`: why the run trains in this process without Ray or Redis (refine.cli.in_process_reason), or None."""
    data = config.data
    if key in SYNTHETIC_ONLY and data.source != "synthetic":
        return f"data.source={data.source!r} is read instead of the synthetic corpus that {key} describes"
    if key in FILE_ONLY and data.source == "synthetic" and data.eval_source is None:
        return "data.source='synthetic' and no data.eval_source: the run reads no data file"
    if key == "data.eval_documents" and data.eval_source is None:
        return "no data.eval_source is set: the run measures no held-out loss"
    if _in_section(key, "refine") and config.train.mode == "ntp" and config.demo is None:
        return "train.mode='ntp' trains next-token prediction only"
    if key == "refine.kl_type" and config.refine.kl_coef == 0:
        return "refine.kl_coef=0 leaves out the KL term"
    if _in_section(key, "service") and in_process is not None:
        return f"{in_process} trains in this process, without Ray or Redis"
    return None


def unread_overrides(config: RunConfig, keys: Iterable[str], in_process: str | None) -> list[str]:
    """One warning per --set key the run will not read (see why_unread), in the order given."""
    warnings = []
    for key in dict.fromkeys(keys):
        why = why_unread(config, key, in_process)
        if why is not None:
            warnings.append(f"--set {key} unused: {why}")
    return warnings
