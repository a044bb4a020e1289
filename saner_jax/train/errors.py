"""The toolkit's one-line user error, in a leaf module that every other one may import."""


class ConfigError(ValueError):
  """A user's mistake: a bad flag or config value, data file, checkpoint or run directory.

  The message is one line that names the problem (the flag, where one is at
  fault) and the fix; the CLI prints it as ``error: ...`` without a traceback.
  """
