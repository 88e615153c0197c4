"""Write the field table of docs/configuration.md from the config schema.

    python scripts/write_config_table.py            # rewrite the table in place
    python scripts/write_config_table.py --check    # exit 1 if the page disagrees

The table sits between the page's two marker lines; tests/test_schema.py fails when it
differs from what the schema generates.
"""

from __future__ import annotations

import pathlib
import sys

from autocontext_jax.config import schema

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- schema-table:start -->", "<!-- schema-table:end -->"


def with_table(page: str) -> str:
    """The page's text with the schema's table between its markers."""
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{schema.markdown_table()}{END}{tail}"


def main() -> None:
    """Rewrite the page, or with --check say whether it is up to date."""
    page = PAGE.read_text()
    wanted = with_table(page)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if page == wanted else f"{PAGE}: the field table differs from the schema")
    PAGE.write_text(wanted)


if __name__ == "__main__":
    main()
