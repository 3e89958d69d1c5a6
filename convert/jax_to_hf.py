"""Same as `mellama convert jax-to-hf ...`, for users without the console script."""

import sys

from mellama_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "jax-to-hf", *sys.argv[1:]]))
