"""Test-wide settings and fixtures.

CPU only; hypothesis without wall-clock deadlines (the first call of a jitted
function compiles, which a deadline would flag); and a working TFDS mock.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("saner_jax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("saner_jax")


@pytest.fixture
def mock_tfds(monkeypatch):
  """``tfds.testing.mock_data`` whose data sources also serve ``__getitems__``.

  TFDS 4.9 mocks ``__getitems__`` with a partial of an unbound function set on
  a MagicMock instance, so it never receives ``self`` and fails with
  "missing 1 required positional argument: 'record_keys'"; ``__getitem__``
  (a magic method, which MagicMock binds) works. The loader uses the batched
  ``__getitems__``, so this patches the function the mock wraps.
  """
  from tensorflow_datasets.testing import mocking

  def getitems(record_keys, generator, serialized=False):
    del serialized  # the decoded path of tfds.data_source never asks for bytes
    return [generator[key] for key in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  return tfds.testing.mock_data
