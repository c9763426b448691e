"""One exception type for every problem a user can fix (bad file, bad data, mismatched models).

The CLI prints its message as one line and exits non-zero; the dashboard shows it inline. Anything
else that escapes is a bug in ccamerge.
"""


class CcamergeError(ValueError):
    """A problem with the user's input, with a message that says what to do."""
