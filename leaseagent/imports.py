"""Importing only the parts of a library that are used (docs/benchmarks.md, "Memory").

pyroute2's and prometheus_client's `__init__` import the whole library: pyroute2
its NDB (with sqlite3), IPDB, IPVS, nl80211, WireGuard, plan9 and more, some 250
modules and ~6 MiB of the agent's RSS; prometheus_client its HTTP servers
and push gateway client (http.server, wsgiref, urllib, email); etcd3aio asks
importlib.metadata for its version (email, zipfile, csv: ~0.9 MiB). The agent uses
a few submodules of each (`pyroute2.iproute.linux`, `prometheus_client.metrics`,
...). `lean_package(name)` registers the package without running its `__init__`,
so importing a submodule imports what that submodule needs and no more.

Nothing else changes: the first time a name the package itself defines is asked
for (`pyroute2.IPRoute`, `prometheus_client.REGISTRY`, in a test or leasectl), the
real `__init__` runs (PEP 562's module `__getattr__`) and the package is whole
from then on. A package already imported is left as it is.

`installed_version(name)` reads a distribution's version from its METADATA on
sys.path, as `importlib.metadata.version` does, without importing it:
importlib.metadata imports email, zipfile and csv (~30 modules, 1.5 MiB of RSS)
to answer one line of a file. A distribution it does not find there (an egg, a
zip) is asked of importlib.metadata.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType

# Dunder names the import system and tools probe for; a lean package answers
# them as an unimported one would, without importing everything.
_PROBED = frozenset({"__all__", "__path__", "__file__", "__wrapped__", "__warningregistry__",
                     "__getattr__"})


def lean_package(name: str) -> None:
    """Register package `name` so that its submodules import without its `__init__`."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed, or not a package: the ordinary import says so
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str) -> object:
        if attr in _PROBED:
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        return getattr(_complete(module), attr)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module


def _complete(module: ModuleType) -> ModuleType:
    """Run the package's own `__init__` in its module, once."""
    module.__dict__.pop("__getattr__", None)
    assert module.__spec__ is not None and module.__spec__.loader is not None
    module.__spec__.loader.exec_module(module)
    return module


def _normalized(distribution: str) -> str:
    """A distribution's name as its .dist-info directory spells it (PEP 503, with _)."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def installed_version(name: str) -> str | None:
    """The version of installed distribution `name`, or None if it is not installed."""
    wanted = _normalized(name)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for found in names:
            if not found.endswith(".dist-info") or _normalized(found.split("-")[0]) != wanted:
                continue
            try:
                with open(os.path.join(entry or ".", found, "METADATA"), encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():
                            break  # the end of the headers
            except OSError:
                continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
