"""The one exception family for bad user input.

Anything raised as `InputError` (or a subclass) is reported by the CLI as one line naming the offending
key/flag and what is allowed, with exit code 2. Runtime failures are other exceptions (exit 1).
"""


class InputError(ValueError):
    """Bad user input: a config key, flag, scenario field or value. The message names it and what is allowed."""
