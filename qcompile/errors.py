"""User-facing errors: one line that names the problem and the fix; the CLI prints it and exits 2."""


class UserError(Exception):
    """A mistake in the user's input. ``str(err)`` is the whole message shown to the user."""

    exit_code = 2


class ValidationFailed(Exception):
    """The emitted ONNX file missed a validation threshold (exit code 1)."""

    exit_code = 1


class QuantizationWarning(UserWarning):
    """The compile went on, but part of the model is not quantized as asked (layers inside modules the quantizer
    cannot reach stay float). The command line shows the same in its layer table and does not repeat it."""
