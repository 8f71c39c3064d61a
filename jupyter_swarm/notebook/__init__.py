"""The notebook experience: `%swarm` magics, live widgets and the kernel's swarm behind them.

`%load_ext jupyter_swarm` registers the magics. Widgets (imported on use, they need ipywidgets and plotly):
``GenerationWidget``, ``SwarmMapWidget``, ``ServePanel``. ``get_kernel_swarm()`` is this kernel's
:class:`~jupyter_swarm.notebook.kernel_swarm.KernelSwarm` (the magics' ``swarm``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationWidget", "ServePanel", "SwarmMapWidget", "get_kernel_swarm", "load_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    from jupyter_swarm.notebook.magics import load_ipython_extension as load

    load(ipython)


def get_kernel_swarm() -> Any:
    """This kernel's swarm (created on first use)."""
    from jupyter_swarm.notebook.kernel_swarm import get_kernel_swarm as get

    return get()


def __getattr__(name: str) -> Any:
    if name in ("GenerationWidget", "ServePanel", "SwarmMapWidget", "SwarmSummary"):
        from jupyter_swarm.notebook import widgets

        return getattr(widgets, name)
    raise AttributeError(name)
