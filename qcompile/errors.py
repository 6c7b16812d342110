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


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that points at the first frame
    outside qcompile (the user's ``qcompile.compile(...)`` line): a fixed level pointed into qcompile/api.py, past
    the decorators and helpers between (``filterwarnings(module=...)`` then never matched the user's module)."""
    import os
    import sys

    roots = _package_roots()
    torch = sys.modules.get("torch")
    if torch is not None:  # hooks and module calls between: the user's frame is past torch's too
        roots += (os.path.dirname(os.path.abspath(torch.__file__)),)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)).startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def _package_roots() -> tuple[str, ...]:
    import os
    import sys

    names = ("qcompile", "qcompile.passes", "qcompile.runtime")
    return tuple(os.path.dirname(os.path.abspath(sys.modules[n].__file__)) for n in names if n in sys.modules)
