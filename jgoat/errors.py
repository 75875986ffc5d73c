"""jgoat's error class: a bad input or state that the user can fix, with a one-line message saying what, where and
what to do. The command line prints such errors as one line (no traceback unless ``--debug``)."""


class JgoatError(ValueError):
    """A user-fixable error (subclass of ValueError, so ``except ValueError`` keeps catching it)."""


class NonFiniteError(JgoatError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is intact."""
