"""A page's form fields are set by one explicit setter each, `set_<field>`: the browser can set those and nothing else
(no generic setter, and Reflex's own `setvar` only reaches vars that have a `set_` handler).

    class TrainState(rx.State):
        steps: str = ""
        set_steps = setter("steps")
"""

from __future__ import annotations

from typing import Any

from app.state.errors import handler
from training.errors import BackpropError


def setter(name: str, kind: type = str) -> Any:
    """The event handler `set_<name>`: sets the form field `name` to a value of type `kind`; any other value is
    refused with UI_EVENT_REFUSED, shown next to the form."""

    def set_value(self, value: Any) -> None:
        if type(value) is not kind:
            raise BackpropError("UI_EVENT_REFUSED", name=name, reason=f"it takes a {kind.__name__}, not {type(value).__name__}")
        setattr(self, name, value)

    set_value.__name__ = set_value.__qualname__ = f"set_{name}"  # Reflex names the event after the qualname's end
    set_value.__annotations__ = {"value": kind, "return": None}
    return handler()(set_value)
