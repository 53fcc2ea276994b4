"""`accelerate launch tools/linear_probe.py ...`: the same arguments as `ssl-vit linear-probe`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("linear-probe")
