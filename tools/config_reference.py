"""Regenerate docs/config.md from the field comments and value tables in ssl_vit/config/pretrain.py (`--check`: only
say whether it is current, exit 1 if not)."""

import argparse
import sys
from pathlib import Path

from ssl_vit.config.reference import render_reference

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when docs/config.md is stale")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    text = render_reference()
    if args.check:
        current = out.is_file() and out.read_text() == text
        print(f"{out} is {'current' if current else 'stale: run python tools/config_reference.py'}")
        sys.exit(0 if current else 1)
    out.write_text(text)
    print(f"wrote {out}")
