"""File output helpers shared by dt-lora commands.

Outputs are written under a temporary name and renamed into place (`atomic_write`,
`atomic_directory`), and dt-lora replaces or deletes only what it made itself and recorded:

- a file output (adapter, merged adapter, kohya LoRA, single-file model) is a .safetensors whose
  `dt_lora` metadata names its kind;
- a whole-folder output (a baked model, an eval or attack report) carries `dt_lora.json`
  (`OUTPUT_MARKER`) with its kind and the list of every file dt-lora put in it;
- a folder of loose outputs (generated or scrambled images) lists the files dt-lora wrote there
  in its `dt_lora.json` (`record_output_files`), and holds nothing else of dt-lora's.

`--overwrite` means the same everywhere: replace an earlier dt-lora output of the same kind, and
only when it holds nothing but what dt-lora recorded; anything else in the way is refused, naming
it (`check_output`, `check_output_files`). Before any work a command claims its output
(`claim_output`): one run at a time per output and per work folder (`output_lock`), and the place
must take new files (`check_writable`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from dt_lora.errors import OutputBusy, OutputInTheWay, OutputNotWritable

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

# What each command writes. A file output's kind is in its safetensors header (`dt_lora` metadata,
# `"kind"`); a folder output's in its `dt_lora.json`, beside the list of every file dt-lora put there.
FILE_KINDS = {"adapter": "a shield adapter", "kohya-lora": "a kohya LoRA", "single-file": "a single-file model"}
FOLDER_KINDS = {"model": "a baked model folder", "report": "a report folder"}
IMAGES = "images"  # a folder of loose generated or scrambled images: only the listed files are dt-lora's


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _folder_kind(marker: dict) -> str | None:
    if isinstance(marker.get("files"), list):
        return IMAGES
    kind = marker.get("kind")
    return kind if kind in FOLDER_KINDS else None


def is_dt_lora_folder(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a whole folder dt-lora wrote (its `dt_lora.json` lists every file in it)."""
    path = Path(path)
    marker = _read_marker(path)
    return marker is not None and _folder_kind(marker) in FOLDER_KINDS and not _foreign_files(path, marker)


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind (`FILE_KINDS`) of a .safetensors dt-lora wrote, or None for any other file.

    Only the JSON header is read, never the tensors. Files written before the kind was recorded are
    told apart by the metadata each kind has always carried.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    try:
        provenance = json.loads(metadata[_DT_METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(provenance, dict):
        return None
    if provenance.get("kind") in FILE_KINDS:
        return provenance["kind"]
    if "baked_unet_fingerprint" in provenance:
        return "single-file"
    if "ss_network_module" in metadata:
        return "kohya-lora"
    return "adapter" if "lora_adapter_metadata" in metadata else None


def is_dt_lora_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a .safetensors dt-lora wrote (its header metadata has a `dt_lora` entry of a known kind)."""
    return file_kind(path) is not None


def remove_if_empty(folder: str | os.PathLike[str]) -> None:
    """Remove `folder` when it is an empty folder: a work folder dt-lora made and has emptied."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()


def _folder_contents(folder: Path) -> list[str]:
    """Every file and link below `folder` (relative POSIX paths, sorted), the marker left out."""
    contents = []
    for root, dirs, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        contents += [(relative / name).as_posix() for name in files]
        contents += [(relative / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(name for name in contents if name != OUTPUT_MARKER)


def _foreign_files(folder: Path, marker: dict) -> list[str]:
    """What is in `folder` that its marker does not list (everything, for a marker without a list)."""
    listed = marker.get("contents")
    listed = set(listed) if isinstance(listed, list) else set()
    return [name for name in _folder_contents(folder) if name not in listed]


def _refuse(path: Path, why: str) -> OutputInTheWay:
    return OutputInTheWay(f"{path} exists and {why}, so --overwrite will not replace it; "
                          "choose another output path or move it away yourself")


def check_output(path: str | os.PathLike[str], overwrite: bool, *, kind: str) -> None:
    """Refuse to write output `path` of `kind` if something is in the way that dt-lora may not replace.

    Free: a missing path, and (for a folder kind) an empty folder. Otherwise, without `overwrite` it is
    refused; with it, it is replaced only if it is a dt-lora output of the same `kind`: a .safetensors
    whose `dt_lora` metadata says so (`file_kind`), or a folder whose `dt_lora.json` says so and lists
    every file in it (a file someone added since is named, and the folder is left alone).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    folder = kind in FOLDER_KINDS
    if folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        raise OutputInTheWay(f"{path} exists; pass --overwrite to replace it")
    wanted = (FOLDER_KINDS | FILE_KINDS)[kind]
    if folder:
        if path.is_symlink() or not path.is_dir():
            raise _refuse(path, "is not a folder")
        marker = _read_marker(path)
        if marker is None:
            raise _refuse(path, f"is not a dt-lora output folder (it has no {OUTPUT_MARKER})")
        found = _folder_kind(marker)
        if found is None:
            raise _refuse(path, f"has a {OUTPUT_MARKER} that lists no files (an older dt-lora's, or not dt-lora's)")
        if found != kind:
            what = "a folder of images dt-lora wrote among other files" if found == IMAGES else "another kind of output"
            raise _refuse(path, f"is {what}, not {wanted}")
        foreign = _foreign_files(path, marker)
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise _refuse(path, f"holds {path / foreign[0]}{more}, which dt-lora did not write "
                                f"(not listed in its {OUTPUT_MARKER})")
    else:
        if path.is_dir():
            raise _refuse(path, "is not a file")
        found = file_kind(path)
        if found is None:
            raise _refuse(path, "is not a file dt-lora wrote (a .safetensors with dt_lora metadata)")
        if found != kind:
            raise _refuse(path, f"is {FILE_KINDS[found]}, not {wanted}")


def _owned_files(folder: Path) -> set[str]:
    """Names of the loose files dt-lora wrote in `folder` (listed in its `dt_lora.json`)."""
    marker = _read_marker(folder)
    if marker is None or _folder_kind(marker) != IMAGES:
        return set()
    return {f for f in marker["files"] if isinstance(f, str)}


def check_output_files(folder: str | os.PathLike[str], names: Iterable[str], overwrite: bool) -> None:
    """Refuse to write the files `names` into `folder` if one exists that may not be replaced.

    With `overwrite`, an existing file is replaced only if an earlier dt-lora run wrote it there
    (it is listed in the folder's `dt_lora.json`, see `record_output_files`).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputInTheWay(f"{folder} exists and is not a folder; choose another output folder")
    existing = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise OutputInTheWay(
            f"{len(existing)} output file(s) already exist in {folder}, e.g. {existing[0]}; "
            "pass --overwrite to replace them"
        )
    owned = _owned_files(folder)
    foreign = [name for name in existing if name not in owned or (folder / name).is_dir()]
    if foreign:
        raise OutputInTheWay(
            f"{folder / foreign[0]} exists and was not written by dt-lora (not listed in "
            f"{folder / OUTPUT_MARKER}), so --overwrite will not replace it"
            + (f" (nor {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; choose another output folder or move those files away yourself"
        )


def record_output_files(folder: str | os.PathLike[str], names: Iterable[str], command: str) -> None:
    """Add `names` to the files `folder`'s `dt_lora.json` says dt-lora wrote (creating it if needed).

    A `dt_lora.json` that is not such a list (a whole-folder output's, or a file that is not ours) is
    left as it is.
    """
    from dt_lora._version import __version__

    folder = Path(folder)
    marker = _read_marker(folder)
    if (folder / OUTPUT_MARKER).exists() and (marker is None or _folder_kind(marker) != IMAGES):
        return
    marker = marker or {"written_by": "dt-lora"}
    marker["files"] = sorted(set(marker.get("files", [])) | set(names))
    marker["dt_lora_version"] = __version__
    marker["last_command"] = command
    with atomic_write(folder / OUTPUT_MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")


def mark_output_folder(folder: str | os.PathLike[str], command: str, kind: str, **details: Any) -> None:
    """Write `dt_lora.json` into a finished whole-folder output: its kind and every file in it, so that a
    later `--overwrite` may replace exactly this (and nothing added to it since)."""
    from dt_lora._version import __version__

    folder = Path(folder)
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder output kind {kind!r}")
    marker = {"written_by": "dt-lora", "kind": kind, "command": command, "dt_lora_version": __version__,
              **details, "contents": _folder_contents(folder)}
    with atomic_write(folder / OUTPUT_MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- writable, before the work


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output `path` that cannot be written: a folder on its way is a file,
    or the nearest existing folder does not take new files (permissions, a read-only disk).

    Nothing is left behind: missing folders are not created here, and the probe file is removed.
    """
    path = Path(path).absolute()
    existing = path.parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritable(f"cannot write {path}: {existing} is a file, not a folder")
    probe = _temp_name(existing / path.name)
    try:
        with open(probe, "x"):
            pass
    except OSError as error:
        raise OutputNotWritable(f"cannot write {path}: {existing} does not take new files "
                                f"({error.strerror or type(error).__name__})") from None
    with suppress(FileNotFoundError):
        probe.unlink()


# ---------------------------------------------------------------- one run per output


_held: dict[str, list] = {}  # lock key → [open lock file, how many times this process holds it]


def _lock_file(path: Path) -> Path:
    """Where the lock of output or work folder `path` lives: one file per path, in the machine's temporary
    folder, so that no lock file sits among the user's files and a killed run's lock is released by the
    system with its process (flock)."""
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / "dt-lora-locks"
    folder.mkdir(mode=0o1777, exist_ok=True)
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    return folder / f"{key}.lock"


@contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `path` (an output, or a work folder) for the block: another process that asks for it meanwhile
    is refused with `OutputBusy`, naming the process that holds it. Re-entrant within one process."""
    import fcntl

    lock_path = _lock_file(Path(path))
    key = str(lock_path)
    if key in _held:
        _held[key][1] += 1
    else:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputBusy(f"{path} is in use by another dt-lora run ({holder}); wait for it to finish, "
                             "or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: dt-lora {' '.join(sys.argv[1:3])}".strip())
        handle.flush()
        _held[key] = [handle, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            handle = _held.pop(key)[0]
            handle.close()  # releases the lock; the small file stays for the next run to reuse


@contextmanager
def claim_output(path: str | os.PathLike[str], overwrite: bool, *, kind: str) -> Iterator[Path]:
    """Everything dt-lora checks before it writes output `path` of `kind`, held for the block: no other
    dt-lora run writes it meanwhile (`output_lock`), anything in the way may be replaced (`check_output`),
    and the place can be written (`check_writable`). Call it before the work, around the work."""
    path = Path(path)
    with output_lock(path):
        check_output(path, overwrite, kind=kind)
        check_writable(path)
        yield path


@contextmanager
def claim_output_files(folder: str | os.PathLike[str], names: Iterable[str], overwrite: bool) -> Iterator[Path]:
    """`claim_output` for loose files `names` in `folder` (generated or scrambled images)."""
    folder = Path(folder)
    with output_lock(folder):
        check_output_files(folder, names, overwrite)
        check_writable(folder / "probe")
        yield folder


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
def atomic_directory(path: str | os.PathLike[str], *, kind: str, command: str, overwrite: bool = False,
                     **details: Any) -> Iterator[Path]:
    """Build a whole-folder output of `kind` under a temporary name beside `path`, then move it into place.

    Readers never see a half-written folder: on error the temporary one is removed and `path` is
    left as it was. An existing `path` is replaced only if it is empty or, with `overwrite`, a
    dt-lora output folder of the same kind holding nothing but what dt-lora wrote (`claim_output`),
    checked again just before it goes, and only once the new one is complete. The new folder gets
    its `dt_lora.json` (`mark_output_folder`, with `command` and `details`) when the block ends.
    """
    import shutil

    with claim_output(path, overwrite, kind=kind) as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        tmp = _temp_name(path)
        tmp.mkdir()
        try:
            yield tmp
            mark_output_folder(tmp, command, kind, **details)
            if path.exists():
                check_output(path, overwrite, kind=kind)  # nothing of the user's was added meanwhile
                old = _temp_name(path)  # a name the next run sweeps, should this one be killed here
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---------------------------------------------------------------- report folders, several processes


@contextmanager
def claim_report_folder(path: str | os.PathLike[str], overwrite: bool) -> Iterator[None]:
    """`claim_output` for an eval or attack report folder, held for the whole run. Under `accelerate
    launch` only the main process claims it: it is the one that writes it (`report_folder`)."""
    from dt_lora import distributed

    if not distributed.is_main():
        yield
        return
    with claim_output(path, overwrite, kind="report"):
        yield


@contextmanager
def report_folder(path: str | os.PathLike[str], *, command: str, overwrite: bool) -> Iterator[Path]:
    """The report folder to write into: built under a temporary name and moved into place complete
    (`atomic_directory`). Under `accelerate launch` only the main process writes; the others compute their
    shares (the library writes nothing on them) and wait until the folder is in place."""
    from dt_lora import distributed

    if distributed.is_main():
        with atomic_directory(path, kind="report", command=command, overwrite=overwrite) as folder:
            yield folder
    else:
        yield Path(path)
    distributed.wait()
