"""A named registry: the one list of valid names of a kind of plug-in
(attention kinds, model families), and its one error message."""

from __future__ import annotations

from typing import Generic, TypeVar
from collections.abc import Callable

from spikeformer_jax import errors

T = TypeVar('T')


class Registry(Generic[T]):
  """name -> item. `unknown(name, names)` is the message for a name that is
  not registered; `sort` lists names sorted rather than in registration order."""

  def __init__(self, what: str, unknown: Callable[[str, tuple], str], sort: bool = False):
    self.what, self._unknown, self._sort = what, unknown, sort
    self._items: dict[str, T] = {}

  def register(self, name: str, item: T, *, replace: bool = False) -> T:
    if not name or not name.isidentifier():
      raise ValueError(f'{self.what} name {name!r}: use a Python identifier.')
    if name in self._items and not replace:
      raise ValueError(f'{self.what} {name!r} is registered already.')
    self._items[name] = item
    return item

  def unregister(self, name: str):
    self._items.pop(name, None)

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._items) if self._sort else self._items)

  def get(self, name: str) -> T:
    if name not in self._items:
      raise errors.ConfigError(self._unknown(name, self.names()))
    return self._items[name]

  def values(self):
    return self._items.values()
