"""Stage registry: stages register through the ``speechmill.stages`` entry-point group.

The engine never imports a concrete stage by name; it asks the registry, which loads
entry points lazily. Tests and notebooks may also :func:`register` a class directly.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from speechmill.pipeline.errors import ConfigError

if TYPE_CHECKING:
    from speechmill.pipeline.stage import Stage

GROUP = "speechmill.stages"
#: helper commands of packages (``speechmill demo-data``): the engine imports no feature
COMMANDS = "speechmill.commands"
_extra: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Register a stage class in this process (entry points are the normal way)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    _extra[cls.name] = cls
    return cls


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    """The installed entry points of ``group`` by name (read once per process: scanning
    every distribution's metadata costs tens of milliseconds)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def available() -> dict[str, str]:
    """Stage name -> entry point value, without importing the stages."""
    names = {n: ep.value for n, ep in _entry_points(GROUP).items()}
    names.update({n: f"{c.__module__}:{c.__qualname__}" for n, c in _extra.items()})
    return dict(sorted(names.items()))


def get(name: str) -> type[Stage]:
    if name in _extra:
        return _extra[name]
    ep = _entry_points(GROUP).get(name)
    if ep is not None:
        cls = ep.load()
        if getattr(cls, "name", None) != name:
            raise ConfigError(
                f"entry point {name!r} ({ep.value}) loads a class whose name is "
                f"{getattr(cls, 'name', None)!r}"
            )
        return cls
    known = ", ".join(available()) or "none"
    raise ConfigError(f"unknown stage {name!r} (known: {known})")


def command(name: str) -> Any:
    """The callable a package registered as command ``name`` (entry-point group
    ``speechmill.commands``)."""
    ep = _entry_points(COMMANDS).get(name)
    if ep is not None:
        return ep.load()
    raise ConfigError(f"no command {name!r} is installed (entry points {COMMANDS})")
