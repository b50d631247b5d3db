"""The one exception type that means "the user asked for something we cannot do"."""


class KdistillError(Exception):
    """Bad input (config, data, checkpoint). The CLI prints it as one line and exits with code 2.

    The message must say what was wrong and how to fix it, in one line.
    """
