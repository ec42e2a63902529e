"""What went wrong, as the `dt-lora` command reports it: one line, and an exit code with one meaning.

    2    a user error: a bad argument, a missing or damaged input file, an output in the way
    1    a runtime failure: training diverged, out of memory, a disk error
    130  interrupted (Ctrl-C)

Library errors that are the caller's fault derive from `UserError` (as well as from the built-in
class they always were, so `except ValueError` keeps working). Built-in exceptions that reach the
command line are classified by `exit_code`.
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USER = 2  # the code argparse uses for bad arguments
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """The input, the arguments or the output path are at fault; the message says which and how."""


class RuntimeFailure(RuntimeError):
    """Valid input, but the work could not be done (the message says why)."""


class OutputInTheWay(UserError, FileExistsError):
    """An output path exists and dt-lora may not replace it (not asked to, or not a dt-lora output)."""


class OutputNotWritable(UserError, PermissionError):
    """An output's place does not take new files (a folder on its way is a file, no permission, a read-only disk)."""


class OutputBusy(UserError):
    """Another dt-lora run holds this output or work folder."""


class NonFinite(UserError, ValueError):
    """Numbers that are NaN or infinite, or would become so: an input, a weight, or what would be written."""


class UnsafeWeights(UserError, ValueError):
    """Model weights that only pickle can read, which dt-lora does not load unless told to."""


# OSErrors that name a path the user gave: a user error. Any other OSError (disk full, I/O error)
# is the machine's.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def exit_code(error: BaseException) -> int | None:
    """The exit code for an expected error, or None for one that is a bug (it gets a traceback)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, UserError):
        return EXIT_USER
    if isinstance(error, RuntimeFailure):
        return EXIT_RUNTIME
    if isinstance(error, (ValueError, *_USER_OS_ERRORS)):
        return EXIT_USER
    if isinstance(error, (OSError, MemoryError, RuntimeError)):  # RuntimeError: torch's, e.g. out of memory
        return EXIT_RUNTIME
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined by "; ", or the class name if it has none)."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, MemoryError) and not text:
        text = "out of memory"
    return text or type(error).__name__
