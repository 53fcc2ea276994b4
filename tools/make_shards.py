"""`accelerate launch tools/make_shards.py ...`: the same arguments as `ssl-vit make-shards`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("make-shards")
