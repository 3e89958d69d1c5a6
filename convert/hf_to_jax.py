"""Same as `mellama convert hf-to-jax ...`, for users without the console script."""

import sys

from mellama_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-jax", *sys.argv[1:]]))
