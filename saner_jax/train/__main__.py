from saner_jax.train.cli import run

run()
