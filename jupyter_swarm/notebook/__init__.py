"""The notebook experience: `%swarm` magics, live widgets and the kernel-side runtime behind them.

`%load_ext jupyter_swarm` registers the magics. Widgets (imported on use, they need ipywidgets and plotly):
``GenerationWidget``, ``SwarmMapWidget``, ``ServePanel``. ``get_runtime()`` is this kernel's swarm runtime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationWidget", "ServePanel", "SwarmMapWidget", "get_runtime", "load_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    from jupyter_swarm.notebook.magics import load_ipython_extension as load

    load(ipython)


def get_runtime() -> Any:
    from jupyter_swarm.notebook.runtime import get_runtime as get

    return get()


def __getattr__(name: str) -> Any:
    if name in ("GenerationWidget", "ServePanel", "SwarmMapWidget", "SwarmSummary"):
        from jupyter_swarm.notebook import widgets

        return getattr(widgets, name)
    raise AttributeError(name)
