"""User-facing errors: one line that names the problem and the fix; the CLI prints it and exits 2."""


class UserError(Exception):
    """A mistake in the user's input. ``str(err)`` is the whole message shown to the user."""

    exit_code = 2


class ValidationFailed(Exception):
    """The emitted ONNX file missed a validation threshold (exit code 1)."""

    exit_code = 1
