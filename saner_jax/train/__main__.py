import sys

from saner_jax.train.cli import main

sys.exit(main())
