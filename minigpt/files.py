"""Writing files so that a crash never leaves half of one, and reading them with errors that name the file.

Every file the project writes goes through ``atomic_write``: the content goes to a temporary file beside the target,
which is then renamed over it. A rename within a folder is atomic, so a reader (or a run resumed after a crash, a
Ctrl-C or a full disk) sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call write(tmp) to fill a temporary file beside path, then rename it to path (mode 0644, less the umask).
    On any failure the temporary file is removed and path is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, whatever the writer used
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of path (a leading byte-order mark dropped). A missing file, a folder, or bytes that are not
    UTF-8 raise one error naming the file and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; expected a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}"
                         f"); convert it, e.g. iconv -f latin1 -t utf-8") from None
    if "\x00" in text:
        raise ValueError(f"{what} {str(path)!r} holds NUL bytes: it looks like a binary file, not text")
    return text.removeprefix("\ufeff")


def write_jsonl(path, rows) -> None:
    """One JSON object a line, written to a temporary file and renamed, so a reader never sees half a file."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path, required=("instruction", "output")) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped). A line that is not JSON, not an object, lacks a required
    field or has a non-string text field raises ValueError naming the file and the line number."""
    rows = []
    for n, line in enumerate(read_text(path, "JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        for name in required:
            if name not in row:
                raise ValueError(f"{path}, line {n}: missing field {name!r} (required: {', '.join(required)})")
        for name in (*required, "instruction", "input", "output", "prompt", "chosen", "rejected"):
            if name in row and not isinstance(row[name], str):
                raise ValueError(f"{path}, line {n}: field {name!r} must be a string, "
                                 f"got {type(row[name]).__name__} {row[name]!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return rows
