"""`accelerate launch tools/visualize.py ...`: the same arguments as `ssl-vit visualize`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("visualize")
