"""A page's form fields are set by one explicit setter each, `set_<field>`: the browser can set those and nothing else
(no generic setter, and Reflex's own `setvar` only reaches vars that have a `set_` handler).

    class TrainState(rx.State):
        steps: str = ""
        set_steps = setter("steps")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.state.errors import handler
from training.errors import BackpropError


def setter(name: str, kind: type = str, then: Callable[[Any], Any] | None = None) -> Any:
    """The event handler `set_<name>`: sets the form field `name` to a value of type `kind`; any other value is
    refused with UI_EVENT_REFUSED, shown next to the form. `then(state)`: what follows a change (its events)."""

    def set_value(self, value: Any) -> Any:
        if type(value) is not kind:
            raise BackpropError("UI_EVENT_REFUSED", name=name, reason=f"it takes a {kind.__name__}, not {type(value).__name__}")
        setattr(self, name, value)
        return then(self) if then is not None else None

    set_value.__name__ = set_value.__qualname__ = f"set_{name}"  # Reflex names the event after the qualname's end
    set_value.__annotations__ = {"value": kind, "return": Any}
    return handler()(set_value)
