"""CLI subcommands, one module each. A module that defines `COMMANDS` (a list of click commands)
is picked up by `register`, so adding a command is adding a file."""

from __future__ import annotations

import importlib
import pkgutil

import click


def register(group: click.Group) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            if command.name not in group.commands:
                group.add_command(command)
