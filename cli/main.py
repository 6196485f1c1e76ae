"""The ``archipel`` command."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="archipel")
def main() -> None:
    """Archipel: a peer-to-peer federation daemon."""
