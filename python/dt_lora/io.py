"""File output helpers shared by dt-lora commands."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write `path` so readers see either the old file or the complete new one.

    Data goes to a hidden temporary file beside `path` (same filesystem), is
    flushed to disk, then renamed over `path`. If the block raises, the
    temporary file is removed and `path` is left untouched.

        with atomic_write(out_dir / "a.png") as f:
            image.save(f, format="PNG")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
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
