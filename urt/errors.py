"""One exception type for bad input: the CLI prints its message (which names the file, sample or
value at fault) without a stack trace; library users catch it like any ValueError."""


class UrtError(ValueError):
    pass


def describe(err: BaseException) -> str:
    """`Type: message` for an error from a library, without the in-memory object reprs some put in it
    (PIL: "cannot identify image file <_io.BytesIO object at 0x7f…>"), which name nothing a user can find."""
    import re

    msg = re.sub(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>|<[\w.]+ object at 0x[0-9a-fA-F]+>", "the data", str(err))
    if type(err).__name__ == "UnidentifiedImageError":
        msg = "not an image format PIL can read (png, jpeg, webp, gif, bmp, tiff, ...)"
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
