"""What the data checks find, as the profile, the suspects stage and their figures share it:
one small module, so that a change to one check's code does not re-key the other's stage."""

from __future__ import annotations

from typing import TypedDict


class GroupMember(TypedDict):
    """An image of a near-duplicate group, and where the split put it."""

    path: str
    split: str  # one of SPLITS, or catdog.data.profile's LEFT_OUT or NOT_USED


class Suspect(TypedDict):
    """An image whose label the probe doubts."""

    path: str  # relative to the manifest's root
    label: str  # the class it is filed under
    probability: float  # the probe's probability of that class, to 4 decimals
