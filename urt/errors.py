"""One exception type for bad input: the CLI prints its message (which names the file, sample or
value at fault) without a stack trace; library users catch it like any ValueError."""


class UrtError(ValueError):
    pass
