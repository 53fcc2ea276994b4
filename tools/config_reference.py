"""Regenerate docs/config.md from the field comments in ssl_vit/config.py."""

from pathlib import Path

from ssl_vit.config_reference import render_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    out.write_text(render_reference())
    print(f"wrote {out}")
