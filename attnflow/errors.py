"""The one exception type that means "the user's input is wrong", not "attnflow is broken".

The CLI turns it into a one-line message on stderr and exit code 1; anything else is a bug and keeps its
traceback.
"""


class AttnflowError(Exception):
    """A data, model or file problem the user can fix; its message is one self-contained line."""
