"""`accelerate launch tools/export.py ...`: the same arguments as `ssl-vit export`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("export")
