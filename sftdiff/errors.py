"""Errors that the CLI turns into one-line messages and documented exit codes.

Every failure a user can cause (a bad file, a wrong base, a full disk) is raised as a subclass of
`SftError`; anything else escaping the library is a bug and keeps its traceback.
"""

from __future__ import annotations


class SftError(Exception):
    """Base class: a one-line message saying what went wrong, where, and what to do."""

    exit_code = 1


class UsageError(SftError):
    """The command line itself is wrong (conflicting or missing options)."""

    exit_code = 2


class FormatError(SftError):
    """An input file is malformed or breaks a rule of the spec (bad input)."""

    exit_code = 3


class VerificationError(SftError):
    """Inputs are well formed but do not belong together (wrong base, shape mismatch)."""

    exit_code = 4


class OutputError(SftError):
    """Reading or writing failed at the operating-system level (disk full, permissions)."""

    exit_code = 5
