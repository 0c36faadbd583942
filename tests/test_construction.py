"""Wide constructors take keywords only, so that two neighbours of one type cannot be swapped.

``Prediction(classes, probabilities, "normal", 0.4, ...)`` with the operating point and the
triage point (or the out-of-distribution score and its threshold) in each other's places type
checks and runs, and every result it gives is wrong. Past the one or two arguments whose
meaning is plain (a sender's destination, a listener's configuration), each of these classes
refuses positional arguments; a change that makes one accept them again fails here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from dp_model.serving.contract import Decision
from dp_model.serving.runner import Runner
from dp_model.training.runtime import Runtime
from pacs_node.config import NodeConfig, OutboxConfig, RetentionConfig, TLSConfig, WebDestination
from pacs_node.delivery.outbox import DestinationSender
from pacs_node.intake.listener import Connection, Listener
from pacs_node.model.prediction import Prediction
from pacs_node.pipeline import Item
from pacs_node.results.identity import ResultIdentity

#: Each class and the arguments it may still take by position, in order.
KEYWORD_ONLY: list[tuple[Callable[..., object], tuple[str, ...]]] = [
    (Prediction, ()),
    (ResultIdentity, ()),
    (NodeConfig, ()),
    (TLSConfig, ()),
    (OutboxConfig, ()),
    (RetentionConfig, ()),
    (WebDestination, ("url",)),
    (Connection, ()),
    (Item, ()),
    (DestinationSender, ("destination", "root")),
    (Listener, ("config",)),
    (Runner, ()),
    (Decision, ()),
    (Runtime, ()),
]


def _name(case: tuple[Callable[..., object], tuple[str, ...]]) -> str:
    return getattr(case[0], "__name__", repr(case[0]))


@pytest.mark.parametrize("cls, positional", KEYWORD_ONLY, ids=[_name(c) for c in KEYWORD_ONLY])
def test_wide_constructors_take_only_their_plain_leading_arguments_by_position(
    cls: Callable[..., object], positional: tuple[str, ...]
) -> None:
    parameters = list(inspect.signature(cls).parameters.values())
    by_position = tuple(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    assert by_position == positional
    # one more argument by position than allowed is refused before any of it is used
    placeholders = [object()] * (len(positional) + 1)
    with pytest.raises(TypeError, match="positional argument"):
        cls(*placeholders)
