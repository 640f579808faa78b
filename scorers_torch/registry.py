"""Named factories: one `Registry` per kind (scorers, latent encoders, text encoders, ...).

Plugins (e.g. a demo's own scorers) register themselves on import; `import_plugins` imports them
by module name so a CLI flag like `--plugins mypkg.my_scorers` can extend any registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps a name to a factory; `build(name, **kwargs)` calls it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering `factory` under `name`; a duplicate name is an error."""

        def decorate(factory: F) -> F:
            if name in self._factories and self._factories[name] is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as `name`; unknown name -> ValueError listing known names."""
        if name not in self._factories:
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self._factories[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Calls the factory registered as `name` with `kwargs`."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories


SCORERS = Registry("scorer")


def import_plugins(modules: Sequence[str]) -> None:
    """Imports each module (empty names skipped); plugins register themselves on import."""
    for module in modules:
        module = module.strip()
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"cannot import plugin module {module!r}: {err}") from err
