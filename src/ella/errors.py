class EllaError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it.

    The CLI prints these as one line (no traceback); anything else that escapes is a bug.
    """
