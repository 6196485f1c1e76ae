"""What every ``archipel`` command shares: the home option and error reporting."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from archipel.crdt import ArchipelError
from archipel.daemon import logs
from archipel.daemon.paths import HOME_ENV, Home

log = logging.getLogger("archipel")

P = ParamSpec("P")
T = TypeVar("T")

READY = re.compile(rb"Archipel node \S+ listening on:")
"""What ``archipel run`` prints (to stderr) once the node is ready and its RPC
serves: what scripts starting a daemon wait for. libp2p's own debug logs say
"listening on" earlier, so match the whole line."""


def ready_line(peer_id: str) -> str:
    return f"Archipel node {peer_id} listening on:"


home_option = click.option(
    "--home",
    "home",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help=f"The node's directory (default: ${HOME_ENV}, else the platform data directory).",
)


def resolve_home(home: str | None) -> Home:
    return Home.resolve(home)


CRASHED = "the node stopped on an unexpected error (a bug): its traceback is in the log above"


def friendly_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Report Archipel's typed errors as one line and exit status 1, without a traceback.

    Any other error is a bug. In a command that logs (``archipel run``), its traceback
    goes to the log, in the log's format (a JSON record with ``--log-format json``), and
    the command exits with status 1 and one line; elsewhere Python prints it as usual.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ArchipelError as exc:
            raise click.ClickException(str(exc)) from None
        except BaseExceptionGroup as group:  # from inside trio.run
            leaf = archipel_error_in(group)
            if leaf is not None:
                raise click.ClickException(str(leaf)) from None
            if isinstance(group, ExceptionGroup):
                _log_crash(group)
            raise
        except Exception as exc:
            _log_crash(exc)
            raise

    return wrapper


def _log_crash(exc: Exception) -> None:
    """If this process logs, log ``exc`` as a crash and exit with one line; else return."""
    if logs.configured():
        log.critical("unexpected error: the node stopped", exc_info=exc)
        raise click.ClickException(CRASHED) from None


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
