"""File output helpers shared by dt-lora commands.

Outputs are written under a temporary name and renamed into place (`atomic_write`,
`atomic_directory`), and dt-lora replaces or deletes only what it made itself:

- a whole-folder output (a baked model, an eval report) carries `dt_lora.json` (`OUTPUT_MARKER`);
- a folder of loose outputs (generated or scrambled images) lists the files dt-lora wrote there
  in its `dt_lora.json` (`record_output_files`);
- a file output (adapter, merged or exported LoRA, single-file checkpoint) is a .safetensors with
  `dt_lora` metadata.

`--overwrite` means the same everywhere: replace such an earlier dt-lora output; anything else in
the way is refused, naming it (`check_output`, `check_output_files`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from .errors import OutputInTheWay

OUTPUT_MARKER = "dt_lora.json"
_DT_METADATA_KEY = "dt_lora"  # adapters.DT_METADATA_KEY; not imported so io stays free of torch


# ---------------------------------------------------------------- temporary names


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")
_swept: set[Path] = set()  # folders already swept by this process


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we would have written; leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or an impossible pid: keep it, to be safe)
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what a killed dt-lora write left in `folder`; returns the removed paths.

    Only names of the exact form `atomic_write`/`atomic_directory` use, `.<name>.<pid>.<8 hex>.tmp`,
    whose process is no longer running on this machine are removed; every other file stays.
    """
    import shutil

    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # missing or unreadable folder: nothing of ours to clean
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        with suppress(FileNotFoundError):  # another run may sweep at the same time
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    """`remove_stale_temps` the first time this process writes into `folder`."""
    key = folder.absolute()
    if key not in _swept:
        _swept.add(key)
        remove_stale_temps(folder)


# ---------------------------------------------------------------- ownership


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_dt_lora_folder(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder dt-lora wrote (it holds a readable `dt_lora.json`)."""
    return _read_marker(Path(path)) is not None


def is_dt_lora_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a .safetensors dt-lora wrote (its header metadata has a `dt_lora` entry).

    Only the JSON header is read, never the tensors.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata()
    except (SafetensorError, OSError, ValueError):
        return False
    return isinstance(metadata, dict) and _DT_METADATA_KEY in metadata


def remove_if_empty(folder: str | os.PathLike[str]) -> None:
    """Remove `folder` when it is an empty folder: a work folder dt-lora made and has emptied."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()


def _not_ours(path: Path, what: str) -> OutputInTheWay:
    return OutputInTheWay(
        f"{path} exists and is not {what}, so --overwrite will not replace it; "
        "choose another output path or move it away yourself"
    )


def check_output(path: str | os.PathLike[str], overwrite: bool, *, folder: bool = False) -> None:
    """Refuse to write `path` if something is in the way that dt-lora may not replace.

    Free: a missing path, and (for a `folder` output) an empty folder. Otherwise, without `overwrite`
    it is refused; with it, it is replaced only if it is a dt-lora output of the same kind (a folder
    with `dt_lora.json`, or a .safetensors with `dt_lora` metadata).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        raise OutputInTheWay(f"{path} exists; pass --overwrite to replace it")
    if folder:
        if path.is_symlink() or not path.is_dir():
            raise _not_ours(path, "a folder")
        if not is_dt_lora_folder(path):
            raise _not_ours(path, f"a dt-lora output folder (it has no {OUTPUT_MARKER})")
    else:
        if path.is_dir():
            raise _not_ours(path, "a file")
        if not is_dt_lora_file(path):
            raise _not_ours(path, "a file dt-lora wrote (a .safetensors with dt_lora metadata)")


def _owned_files(folder: Path) -> set[str] | None:
    """Names dt-lora wrote in `folder`; None when the whole folder is a dt-lora output."""
    marker = _read_marker(folder)
    if marker is None:
        return set()
    files = marker.get("files")
    if files is None:
        return None  # a baked model or report folder: everything in it is dt-lora's
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def check_output_files(folder: str | os.PathLike[str], names: Iterable[str], overwrite: bool) -> None:
    """Refuse to write the files `names` into `folder` if one exists that may not be replaced.

    With `overwrite`, an existing file is replaced only if an earlier dt-lora run wrote it there
    (it is listed in the folder's `dt_lora.json`, see `record_output_files`).
    """
    folder = Path(folder)
    existing = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise OutputInTheWay(
            f"{len(existing)} output file(s) already exist in {folder}, e.g. {existing[0]}; "
            "pass --overwrite to replace them"
        )
    owned = _owned_files(folder)
    foreign = [name for name in existing if owned is not None and name not in owned]
    if foreign:
        raise OutputInTheWay(
            f"{folder / foreign[0]} exists and was not written by dt-lora (not listed in "
            f"{folder / OUTPUT_MARKER}), so --overwrite will not replace it"
            + (f" (nor {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; choose another output folder or move those files away yourself"
        )


def record_output_files(folder: str | os.PathLike[str], names: Iterable[str], command: str) -> None:
    """Add `names` to the files `folder`'s `dt_lora.json` says dt-lora wrote (creating it if needed).

    A folder whose marker has no file list is a whole dt-lora output and is left as it is.
    """
    from . import __version__

    folder = Path(folder)
    marker = _read_marker(folder)
    if (folder / OUTPUT_MARKER).exists() and (marker is None or "files" not in marker):
        return  # a whole-folder output's provenance (or a file that is not ours): leave it alone
    marker = marker or {"written_by": "dt-lora"}
    files = marker.get("files") if isinstance(marker.get("files"), list) else []
    marker["files"] = sorted(set(files) | set(names))
    marker["dt_lora_version"] = __version__
    marker["last_command"] = command
    with atomic_write(folder / OUTPUT_MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")


def mark_output_folder(folder: str | os.PathLike[str], command: str, **details: Any) -> None:
    """Write `dt_lora.json` into a whole-folder output so a later `--overwrite` may replace it."""
    from . import __version__

    with atomic_write(Path(folder) / OUTPUT_MARKER, "w") as f:
        json.dump({"written_by": "dt-lora", "command": command, "dt_lora_version": __version__, **details},
                  f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- atomic writes


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write `path` so readers see either the old file or the complete new one.

    Data goes to a hidden temporary file beside `path` (same filesystem), is
    flushed to disk, then renamed over `path`. If the block raises, the
    temporary file is removed and `path` is left untouched. Missing parent
    folders are created, as `atomic_directory` creates them.

        with atomic_write(out_dir / "a.png") as f:
            image.save(f, format="PNG")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = _temp_name(path)
    try:
        # 'x': never clobber a file someone else created under that name.
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside `path`, then move it into place.

    Readers never see a half-written folder: on error the temporary one is removed and `path` is
    left as it was. An existing `path` is replaced only if it is empty or, with `overwrite`, a
    dt-lora output folder (`check_output`), and only once the new one is complete. The caller
    writes `dt_lora.json` into the new folder (see `mark_output_folder`).
    """
    import shutil

    path = Path(path)
    check_output(path, overwrite, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
