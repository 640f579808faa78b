"""Named factories: one `Registry` per kind (scorers, latent encoders, text encoders, ...).

Plugins (e.g. a demo's own scorers) register themselves on import; `import_plugins` imports them
by module name so a CLI flag like `--plugins mypkg.my_scorers` can extend any registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bdpo_jax.schema import UserError

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(UserError, ValueError):
    """A name (from a flag or a spec) that no factory of a registry has."""


class PluginImportError(UserError, ImportError):
    """A `--plugins` module that does not exist."""


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

    def get(self, name: str, flag: str | None = None) -> Callable[..., Any]:
        """The factory registered as `name`; an unknown name raises UnknownNameError listing
        the known names (prefixed by `flag`, the CLI flag that gave the name, if any)."""
        if name not in self._factories:
            known = ", ".join(self.names()) or "(none)"
            where = f"{flag}: " if flag else ""
            raise UnknownNameError(
                f"{where}unknown {self.kind} {name!r}; known {self.kind}s: {known}"
            )
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
    """Imports each module (empty names skipped); plugins register themselves on import.

    A module that does not exist is a user error (PluginImportError naming `--plugins`); an
    ImportError raised inside an existing plugin keeps its traceback.
    """
    for module in modules:
        module = module.strip()
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            missing = getattr(err, "name", None)
            if (
                isinstance(err, ModuleNotFoundError)
                and missing
                and (module + ".").startswith(missing + ".")
            ):
                raise PluginImportError(
                    f"--plugins: cannot import plugin module {module!r}: {err}"
                ) from err
            raise ImportError(f"cannot import plugin module {module!r}: {err}") from err
