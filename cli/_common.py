"""What every ``archipel`` command shares: the home option and error reporting."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from archipel.crdt import ArchipelError
from archipel.daemon.paths import HOME_ENV, Home

P = ParamSpec("P")
T = TypeVar("T")

home_option = click.option(
    "--home",
    "home",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help=f"The node's directory (default: ${HOME_ENV}, else the platform data directory).",
)


def resolve_home(home: str | None) -> Home:
    return Home.resolve(home)


def friendly_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Report Archipel's typed errors as one line and exit status 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ArchipelError as exc:
            raise click.ClickException(str(exc)) from None
        except BaseExceptionGroup as group:  # from inside trio.run
            leaf = archipel_error_in(group)
            if leaf is None:
                raise
            raise click.ClickException(str(leaf)) from None

    return wrapper


def archipel_error_in(group: BaseExceptionGroup[BaseException]) -> ArchipelError | None:
    """The first of our typed errors in a (nested) exception group, if any."""
    for exc in group.exceptions:
        if isinstance(exc, ArchipelError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = archipel_error_in(exc)
            if found is not None:
                return found
    return None
