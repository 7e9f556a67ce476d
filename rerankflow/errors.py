"""Exceptions that carry a message a user can act on."""


class InputError(ValueError):
    """Bad user input: the message names the file (and line) or config key and what was expected."""

    def __init__(self, message: str, *, path=None, line: int | None = None, key: str | None = None):
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if key is not None:
            where.append(f"config key '{key}'")
        prefix = (" / ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.path = path
        self.line = line
        self.key = key
