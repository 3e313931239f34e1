"""A tiny name -> object registry (architectures, SSL methods).

Unknown names raise :class:`~nnssl.errors.NnsslError` listing every registered name, so a
typo on the command line gets an answer instead of a traceback.
"""
from typing import Callable, Dict, Generic, List, TypeVar

from nnssl.errors import NnsslError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str = ""):
        self.kind = kind  # e.g. "architecture"; used in error messages
        self.flag = flag  # e.g. "-a"; used in error messages
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ARCHITECTURES.register("pct_net")``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        if name not in self._items:
            flag = f" ({self.flag})" if self.flag else ""
            raise NnsslError(
                f"Unknown {self.kind}{flag} '{name}'. Choose one of: {', '.join(self.names())}."
            )
        return self._items[name]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def items(self):
        return sorted(self._items.items())
