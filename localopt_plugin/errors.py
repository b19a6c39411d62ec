"""The one error type for problems with a user's settings or data.

Library code raises :class:`UserError` (a ``ValueError``) with a message naming the flag, file
or value to change; only the command-line entry points (``localopt_plugin.commands``) turn it
into a one-line ``error: ...`` exit. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A setting or input the user must change; the message says what and how."""
