"""`python tools/benchmark_suite.py ...`: the same arguments as `ssl-vit benchmark-suite`."""

from ssl_vit.cli.main import run_tool

if __name__ == "__main__":
    run_tool("benchmark-suite")
