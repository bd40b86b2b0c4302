"""Write the docs tables that code holds (request options, backends) into the README and docs pages.

python scripts/docs_tables.py           # rewrite the tables between their markers
python scripts/docs_tables.py --check   # exit 1, naming them, when a table is out of date
"""

from __future__ import annotations

import argparse
import sys

from yolonas_tools.docs import stale_tables, write_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; fail when a table is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_tables()
        for name in stale:
            print(f"out of date: {name} (run python scripts/docs_tables.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_tables():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
