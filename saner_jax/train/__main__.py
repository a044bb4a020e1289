from saner_jax.train.cli import run

# Guarded: the streaming pipeline's decoding processes import this module again.
if __name__ == "__main__":
  run()
