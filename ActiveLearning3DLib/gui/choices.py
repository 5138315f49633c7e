"""The panel's choice lists (query methods, starting methods, devices, training profiles) and their defaults.

One place, read from the method registry, the training profiles and the
defaults of :class:`~ActiveLearning3DLib.gui.annotation.PanelSettings`, so that the combo
boxes offer exactly what the library accepts. Importing this module needs
neither torch nor scipy: the Slicer panel builds its lists before the first
use installs them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..nnunet.profiles import DEVICES, profile_names
from ..pipeline import DEFAULT_INIT, INITS
from ..query_methods import METHODS
from .annotation import PanelSettings


@dataclass(frozen=True)
class PanelChoices:
    """What each combo box lists, and what it shows first."""

    methods: tuple[str, ...]
    start_methods: tuple[str, ...]
    devices: tuple[str, ...]
    profiles: tuple[str, ...]
    method: str
    start_method: str
    device: str
    profile: str
    inits: tuple[str, ...] = INITS  # how a loop's members start
    init: str = DEFAULT_INIT


def panel_choices() -> PanelChoices:
    """The lists of the panel, from the registry and the profiles.

    Loop methods: every method that needs neither the pool embeddings nor the
    ground truth (the latter exist to simulate an annotator). Starting methods:
    every method that needs no model, label-free ones first. Profiles: ``auto``
    (``paper`` on a GPU, else ``cpu-small``) and the named profiles.
    """
    methods = tuple(m.name for m in METHODS.values() if not m.needs_embeddings and not m.simulation_only)
    no_model = [m for m in METHODS.values() if not m.needs_model]
    start = tuple(m.name for m in sorted(no_model, key=lambda m: (not m.needs_embeddings, m.simulation_only)))
    defaults = {f.name: f.default for f in fields(PanelSettings)}
    return PanelChoices(
        methods=methods,
        start_methods=start,
        devices=tuple(DEVICES),
        profiles=("auto", *profile_names()),
        method=defaults["method"],
        start_method=defaults["start_method"],
        device=defaults["device"],
        profile=defaults["profile"],
        inits=INITS,
        init=defaults["init"],
    )


__all__ = ["PanelChoices", "panel_choices"]
