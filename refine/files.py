"""Files a run writes whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole or not at all: a run killed mid-write leaves the previous file, never half of one.
    The text goes to a new temporary file beside `path` first (`_create_temporary`: never an existing file or
    a link another user planted in a shared directory), mode 0666 less the umask as open() gives a new file."""
    temp: Path | None = None
    try:
        temp, descriptor = _create_temporary(path)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename, so that a machine crash cannot leave it empty
        os.replace(temp, path)
    except BaseException as error:  # text that cannot be encoded, a full disk: no half-written temporary file stays
        if temp is not None:
            temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise naming(error, path) from None
        raise


def write_output(path: str | Path, text: str) -> None:
    """Write a file the user named (an --output): replaced whole (write_atomically) when it is a regular file or
    not there yet, written into when it is something else (a FIFO, /dev/stdout), and through a link to the file
    it names. Replacing would put a regular file in place of the link, the FIFO or the device node."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        try:
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as error:
            raise naming(error, target) from None
        return
    write_atomically(target, text)


# A temporary file's name: ".<name>.<random>.tmp", the name cut to this many bytes (a file name holds 255).
_TEMP_NAME_BYTES = 200
_CREATE_EXCLUSIVELY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new file beside `path`, opened for writing: its path and descriptor. Created exclusively (O_EXCL,
    O_NOFOLLOW) under a name no one can guess, so a file or a symbolic link planted in a shared directory is
    never written through (the fixed ".<name>.tmp" followed a link to any file the run's user can write). The
    mode is 0666 less the umask (and a directory's default ACL), as open(path, "w") makes it: tempfile.mkstemp's
    0600 would hide a discovery file from a Prometheus running as another user."""
    stem = os.fsdecode(os.fsencode(path.name)[:_TEMP_NAME_BYTES])
    for _ in range(100):
        temp = path.with_name(f".{stem}.{secrets.token_hex(8)}.tmp")
        try:
            return temp, os.open(temp, _CREATE_EXCLUSIVELY, 0o666)
        except FileExistsError:  # a name taken (planted, or 2**-64 bad luck): draw another
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name beside it", str(path))


def check_output_is_a_file_path(path: str, flag: str) -> None:
    """Refuse an output path that ends in a separator: it names a folder, yet Path() drops the separator and the
    output would be written to a file of the folder's name."""
    if path.endswith(("/", os.sep)):
        raise ValueError(f"{flag} {path!r} ends in {path[-1]!r}, which names a folder: give a file path")


def check_output_spares_inputs(output: str | Path, inputs: dict[str, str | Path | None], flag: str = "--output",
                               model_dir: str | Path | None = None) -> None:
    """Refuse an output path that is one of a command's input files (`inputs`: flag -> path), or a file of the model
    directory other than a results file (eval-*.json): writing the output would destroy it."""
    target = Path(output)
    if not target.exists():
        return
    candidates = [(f"{name} {str(path)!r}", Path(path)) for name, path in inputs.items() if path is not None]
    if model_dir is not None and Path(model_dir).is_dir():
        candidates += [(f"the file {file.name!r} of --model {str(model_dir)!r}", file)
                       for file in Path(model_dir).iterdir() if file.is_file() and not file.name.startswith("eval-")]
    for described, path in candidates:
        try:
            same = path.exists() and target.samefile(path)
        except OSError:
            continue
        if same:
            raise ValueError(f"{flag} {str(output)!r} is {described}: writing the results would replace it; give "
                             f"another path")


def naming(error: OSError, path: str | Path) -> OSError:
    """`error` as one that names `path`: a failed write() or fsync() names no file, so that a full disk would
    read as a bare "[Errno 28] No space left on device"."""
    if error.errno is None:
        return OSError(f"{path}: {error}")
    return OSError(error.errno, error.strerror, str(path))


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def file_system_error(error: BaseException) -> OSError | None:
    """The file system's refusal (a full disk, a file too large, a directory gone) behind a failed write: `error`
    itself, the OSError that torch.save met writing to a Python file (its RuntimeError only says "unexpected
    pos"; the OSError is in its context), or the one that safetensors' Rust code puts in its message
    ("I/O error: ... (os error 28)"). None for a failure of another kind."""
    for current in error_chain(error):
        if isinstance(current, OSError):
            return current
        match = _RUST_OS_ERROR.search(str(current))
        if match:
            number = int(match.group(1))
            return OSError(number, os.strerror(number))
    return None


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the errors it was raised from or while handling (its cause, else its context), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def sync_tree(path: Path) -> None:
    """fsync every file under directory `path`, then every directory, its subdirectories first and `path` last:
    the files' contents and names are on disk before a rename publishes `path`, which a machine crash could
    otherwise leave holding empty or missing files. Call `sync_directory` on the parent after that rename."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _sync(os.path.join(root, name), os.O_RDONLY)
        sync_directory(root)


def sync_directory(path: str | Path) -> None:
    """fsync directory `path` itself: the names created, renamed or removed in it are on disk (POSIX makes a
    rename durable only once its directory is synced)."""
    _sync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync(path: str | Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_name_part(text: str) -> str:
    """`text` as part of a file name: letters, digits, "-", "_" and "." kept, anything else "_" (so never "~",
    which the callers put after such a part: one name's part is then never a prefix of another's match)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
