"""`accelerate launch tools/pretrain.py ...`: the same arguments as `ssl-vit pretrain`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("pretrain")
