"""Atomic output: write into a temporary sibling, rename when complete.

A crash or a bad input never leaves a half-written file or directory where the user
expects a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give every file and folder under `root` the modes the umask allows.

    Writers that go through a temporary file (safetensors' `save_file`, `mkstemp`) create 0600
    files; a result directory should be as readable as anything else the user writes.
    """
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for names, mode in ((dirnames, 0o777), (filenames, 0o666)):
            for name in names:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):  # a link's target is not ours to change
                    os.chmod(path, mode & ~mask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_orphans(target: Path) -> None:
    """Temporary folders left for `target` by a killed run (its process is gone): a pruned 7B model's
    half-written shards are gigabytes, so the next run clears them before it starts."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-(\d+)-")
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        match = pattern.match(p.name)
        if match and p.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block succeeds.

    On success every file and folder inside gets the umask's modes (see `_apply_umask`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; results should be as readable as any file
    try:
        yield tmp
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename over `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, with stable key order and a trailing newline."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file as stored, so a result names exactly the data it was computed on."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
