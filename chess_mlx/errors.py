class ChessError(ValueError):
    """Bad input from the user: the CLIs print it as one line and exit non-zero."""
