"""User-facing errors: the CLI prints them as one line and exits with their code, never a traceback.

Exit codes: 0 ok, 1 a check ran and failed (`CheckFailed`), 2 bad input or environment (every other
`EdgeError`, a full disk, a read-only path), 3 an internal error (a bug; see cli.py), 130 Ctrl-C,
143 SIGTERM.
"""

INTERNAL_ERROR = 3


class EdgeError(Exception):
    """A problem the user can fix (bad input, bad checkpoint, bad bundle). Exit code 2."""

    exit_code = 2


class CheckpointError(EdgeError):
    """A checkpoint directory that cannot be read: missing files, missing or mis-shaped tensors."""


class InputError(EdgeError):
    """A bad image, prompt, flag value or file path."""


class ContextOverflowError(InputError):
    """Prompt plus requested new tokens do not fit the model's context."""


class BundleError(EdgeError):
    """A bundle whose manifest, schema version or checksums are wrong."""


class CheckFailed(EdgeError):
    """A check ran and failed (a parity gate, a published target, a bad bundle file): exit code 1."""

    exit_code = 1
