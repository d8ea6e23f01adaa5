"""The exception family and the one-line error text every message is made with."""

from cxr_batch.errors import CheckpointError, CxrError, DecodeError, InputError, TrainingError, one_line


def test_one_line_folds_whitespace_cuts_and_names_an_empty_error():
    assert one_line(OSError("disk\n  failed\twhile reading")) == "disk failed while reading"
    assert one_line(ValueError("x" * 500)) == "x" * 200 and len(one_line(ValueError("x" * 500), 50)) == 50
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line("  plain\ntext ") == "plain text"


def test_every_user_fixable_error_is_a_cxr_error():
    for cls in (InputError, CheckpointError, DecodeError, TrainingError):
        assert issubclass(cls, CxrError)
    assert issubclass(InputError, ValueError)  # a bad value, for callers of the library
