"""User-facing errors.

Every error a user can cause (bad input file, unknown name, missing preprocessing step) is
raised as :class:`NnsslError` with a message that names the offending input and says how to
fix it. The command-line entry points print the message and exit non-zero; library callers
can catch it. Programming errors stay ordinary exceptions with tracebacks.
"""


class NnsslError(Exception):
    """An error caused by the user's input; the message says what is wrong and how to fix it."""
