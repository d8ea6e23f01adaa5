"""Domain exceptions. The CLI turns each into a one-line message; batch jobs turn per-file
failures into an ``error`` value on that file's row instead of raising."""


class CxrError(Exception):
    """Base class: something the user can fix, with a message that says how."""


class InputError(CxrError):
    """A bad argument or input path (the archive, an option value)."""


class CheckpointError(CxrError):
    """A checkpoint that is missing, foreign, or unsafe to load."""


class DecodeError(CxrError):
    """One image that cannot be turned into pixels. Its message becomes the row's ``error``."""
