"""How the commands with a text and a JSON output are asked for one: `--format text|json`, as `explain` and
`suggest` take it, and `--json`, the shorthand `audit` and `diff` documented first (kept, so scripts using it
still work)."""

from __future__ import annotations

import argparse

FORMATS = ("text", "json")


def add_format_arguments(parser: argparse.ArgumentParser, *, json_help: str) -> None:
    """`--format text|json` (default text) and `--json`, both setting `args.format` (the last given wins)."""
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (default) or json")
    parser.add_argument(
        "--json", dest="format", action="store_const", const="json", help=f"{json_help} (--format json)"
    )
