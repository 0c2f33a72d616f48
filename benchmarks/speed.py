"""Speed benchmark, the same as ``vitlab bench``: ``python benchmarks/speed.py [--quick] [--out FILE]``."""
import sys

from vitlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
