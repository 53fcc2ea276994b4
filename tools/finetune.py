"""`accelerate launch tools/finetune.py ...`: the same arguments as `ssl-vit finetune`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("finetune")
