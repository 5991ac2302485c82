"""One base class for errors a user can fix: the CLI prints their message as one line, no traceback."""


class UnmaskError(Exception):
    pass
