"""Named components of one kind (training objectives, attacks), each with the config dataclass it reads.

A registry knows its built-in components by name without importing them (name -> the module that
registers it), so reading a config imports only the components it names: a typo'd name is refused
at once, a typo'd parameter after importing that one component. A component registers itself in its
own file; a built-in one also gets a line in its registry's table, a user's is imported through the
config's ``plugins`` list::

    @dataclass
    class ScaledConfig:
        factor: float = 2.0

    @register("scaled", config=ScaledConfig)   # defend.objectives.register: OBJECTIVES.register, named
    class Scaled(Objective):
        ...

Its settings are then ``objective.scaled.*``, checked against ``ScaledConfig`` when the config loads.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defend.errors import ConfigError


@dataclass(frozen=True)
class Component:
    name: str
    impl: Any  # the class (or factory) the library builds
    config: type | None  # its settings' dataclass (None: it has none)


class Registry:
    def __init__(self, kind: str, section: str, builtins: dict[str, str], settings: dict[str, str] | None = None):
        self.kind = kind  # "objective": how messages name one
        self.section = section  # its config section ("objective"): settings are <section>.<name>.*
        self._modules = dict(builtins)  # name -> the module whose import registers it
        # name -> "module:Class" of a built-in's settings in a lighter module than its own (no torch), so
        # reading a config that names it imports only that
        self._settings = dict(settings or {})
        self._components: dict[str, Component] = {}

    def register(self, name: str, *, config: type | None = None) -> Callable[[Any], Any]:
        def add(impl: Any) -> Any:
            owner = self._modules.setdefault(name, impl.__module__)
            if owner != impl.__module__:  # else one of the two would silently replace the other
                raise ConfigError(f"{impl.__module__} registers the {self.kind} '{name}', which {owner} already"
                                  f" names; give yours another name (known: {', '.join(self.names())}).")
            if name in self._settings and config is not self._settings_class(name):
                raise ConfigError(f"{impl.__module__} registers the {self.kind} '{name}' with settings"
                                  f" {getattr(config, '__name__', config)}, but its registry's table names"
                                  f" {self._settings[name]}; register it with that class.")
            self._components[name] = Component(name, impl, config)
            return impl

        return add

    def _settings_class(self, name: str) -> type:
        module, cls = self._settings[name].split(":")
        return getattr(importlib.import_module(module), cls)

    def config(self, name: str) -> type | None:
        """The settings dataclass of ``name`` (None: it has none), importing as little as it can."""
        if name not in self._components and name in self._settings:
            return self._settings_class(name)
        return self.get(name).config

    def names(self) -> list[str]:
        return sorted(set(self._modules) | set(self._components))

    def __contains__(self, name: str) -> bool:
        return name in self._modules or name in self._components

    def unknown(self, name: str) -> str:
        """Why ``name`` is not a component: the known names and the closest one."""
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}.{hint} Your own {self.kind}"
                f"s register in their own file, imported through `plugins: [your.module]` (docs/extending.md).")

    def get(self, name: str) -> Component:
        """The component, importing its module on first use."""
        if name not in self._components and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._components:
                raise LookupError(f"{self._modules[name]} does not register the {self.kind} '{name}'.")
        if name not in self._components:
            raise KeyError(self.unknown(name))
        return self._components[name]
