"""`accelerate launch tools/knn.py ...`: the same arguments as `ssl-vit knn`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("knn")
