"""The one exception type the command turns into a clear message (no traceback, exit code 2)."""


class EvalError(Exception):
    """A user-facing problem with the inputs: unknown dataset/trainer/fold, missing file, bad shape..."""
