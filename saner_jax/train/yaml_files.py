"""YAML for config files: PyYAML's safe loader, refusing a key given twice in one mapping.

PyYAML keeps the last of two equal keys without a word. In a config whose
section names are also field names (``model``, ``optimizer``, ``saner``,
``pipeline``), an appended ``optimizer: sam`` would then drop the whole
``optimizer:`` section, so a repeated key is an error instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
  pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
  seen: set[Any] = set()
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if key in seen:
      raise yaml.constructor.ConstructorError(
        None, None, f"key {key!r} is given twice in one mapping; keep one", key_node.start_mark
      )
    seen.add(key)
  return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(text: str) -> Any:
  """``yaml.safe_load(text)``, but a key repeated within one mapping raises ``yaml.YAMLError``."""
  return yaml.load(text, Loader=_UniqueKeyLoader)
