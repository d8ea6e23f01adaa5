"""Domain exceptions, the one-line error text, and the exit codes of every command.

Everything a user can fix raises a ``CxrError`` subclass with a message that says what was wrong
and what to do; the CLI prints it as one line ("Error: ...") and exits with ``EXIT_ERROR``. Batch
jobs turn per-file failures into an ``error`` value on that file's row instead of raising.
"""

EXIT_OK = 0
EXIT_ERROR = 1  # a CxrError: one line "Error: ..." on stderr
EXIT_USAGE = 2  # click's own: an unknown option, a value out of range, a missing argument
EXIT_INCOMPLETE = 3  # the run finished, but some files failed for a transient reason: run it again


class CxrError(Exception):
    """Base class: something the user can fix, with a message that says how. ``exit_code``: the
    process's exit status when the CLI stops on it."""

    exit_code = EXIT_ERROR


class InputError(CxrError, ValueError):
    """A bad argument or input path (the archive, an option value). Also a ValueError, which is
    what a library caller passing a bad value would expect to catch."""


class CheckpointError(CxrError):
    """A checkpoint that is missing, foreign, or unsafe to load."""

    @classmethod
    def not_a_file(cls, uri: str, *, folder: bool) -> "CheckpointError":
        """A --model path that is missing or a folder: one message whichever reader found it."""
        if folder:
            return cls(f"{uri} is a folder; pass the checkpoint file in it (e.g. best.ckpt).")
        return cls(f"Checkpoint not found: {uri}")


class DecodeError(CxrError):
    """One image that cannot be read or turned into pixels. Its message becomes the row's ``error``."""


class Skipped(DecodeError):
    """A file the job does not score by design (its DICOM header says it is no frontal chest
    radiograph): a final verdict with status "skipped", not a fault of the file. ``meta`` holds the
    header's attributes its row may carry (modality, view position, SOP Instance UID)."""

    def __init__(self, message: str, meta: dict | None = None):
        super().__init__(message)
        self.meta = meta or {}


class TransientError(DecodeError):
    """A file that could not be read for a reason outside the file (an I/O error, a folder that
    vanished, a timeout, throttling, no space, out of memory). Never a final verdict: the run retries
    it, and what still fails gets status "retry", which the next run scores again."""


class NotRegularFile(DecodeError):
    """An archive path that is a FIFO, a socket, a device or a folder: never read (a FIFO would wait for
    a writer forever, a device would stream without end). A property of the path, so a final verdict."""


class Stalled(CxrError):
    """No progress for --stall-timeout seconds: the run stops; what it published is kept, so a re-run
    resumes (exit code 3)."""

    exit_code = EXIT_INCOMPLETE


class TrainingError(CxrError):
    """Training stopped in its workers (after Ray Train's restarts); the message is the cause."""


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """An exception (or text) as one line of at most ``limit`` characters: whitespace runs,
    newlines included, become one space; an empty message becomes the exception's type name."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text[:limit]
