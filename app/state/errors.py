"""Every event handler of every page is declared with `handler`: whatever it raises, its busy flag ends cleared and the
error shows next to the control that started it, as `[CODE] message — hint`.

    @handler(background=True, busy="busy")   # refused while busy; busy set, then cleared however the body ends
    async def start(self): ...

A BackpropError is shown as it is. Anything else is a bug: it is shown as RUNTIME_UNEXPECTED, and its traceback goes
to the server's log (the terminal of `backprop ui`). Never a spinner that spins forever.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import reflex as rx

from training.errors import BackpropError

log = logging.getLogger("backprop.ui")
HANDLED = "__backprop_handled__"  # marks a function wrapped by `handler` (tests check every page handler has it)


def error_text(exc: BackpropError) -> str:
    return f"[{exc.code}] {exc.message} — {exc.hint}" if exc.hint else f"[{exc.code}] {exc.message}"


def as_error(exc: Exception, where: str) -> BackpropError:
    """The coded error to show for `exc`; an exception that is not a BackpropError is logged with its traceback."""
    if isinstance(exc, BackpropError):
        return exc
    log.error("Unexpected error in %s", where, exc_info=exc)
    return BackpropError("RUNTIME_UNEXPECTED", where=where, reason=f"{type(exc).__name__}: {exc}")


def handler(
    *,
    background: bool = False,
    busy: str | None = None,
    claim: Callable[[Any], Any] | None = None,
    error: str | None = "error",
    hint: str | None = None,
) -> Callable[[Callable], Any]:
    """An rx.event whose failures are shown in the var `error` (the hint apart in `hint`, if the page has one; `error`
    None: logged only). With `busy`, the handler first claims that var: it is set to `claim(state)` (default True) and
    the handler is refused while it already holds that value (or the claim is empty); the errors are cleared; at the
    end the var is reset, if it still holds this claim. A follow loop claims the id of the run it follows, so a new
    run can be followed while the loop of the old one winds down."""

    def show(state: Any, exc: Exception, where: str) -> None:
        shown = as_error(exc, where)
        if error is None:
            log.warning("%s: %s", where, shown)
        elif hint is None:
            setattr(state, error, error_text(shown))
        else:
            setattr(state, error, f"[{shown.code}] {shown.message}")
            setattr(state, hint, shown.hint)

    def take(state: Any) -> Any:
        claimed = claim(state) if claim else True
        if not claimed or getattr(state, busy) == claimed:
            return None
        setattr(state, busy, claimed)
        for name in (error, hint):
            if name is not None:
                setattr(state, name, "")
        return claimed

    def end(state: Any, failure: Exception | None, claimed: Any, where: str) -> None:
        if failure is not None:
            show(state, failure, where)
        if claimed is not None and getattr(state, busy) == claimed:
            setattr(state, busy, type(claimed)())  # False, or "" for a claimed id

    def decorate(fn: Callable) -> Any:
        where = fn.__qualname__
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run(self, *args, **kwargs):
                claimed = None
                if busy is not None:
                    async with self:  # a no-op outside background tasks
                        claimed = take(self)
                    if claimed is None:
                        return None
                failure = None
                try:
                    return await fn(self, *args, **kwargs)
                except Exception as exc:
                    failure = exc
                    return None
                finally:
                    if failure is not None or claimed is not None:
                        async with self:  # the error and the freed control reach the page together
                            end(self, failure, claimed, where)

        else:
            if background:
                raise TypeError(f"{where}: a background handler must be async")

            @functools.wraps(fn)
            def run(self, *args, **kwargs):
                claimed = take(self) if busy is not None else None
                if busy is not None and claimed is None:
                    return None
                failure = None
                try:
                    return fn(self, *args, **kwargs)
                except Exception as exc:
                    failure = exc
                    return None
                finally:
                    end(self, failure, claimed, where)

        setattr(run, HANDLED, True)
        return rx.event(run, background=background)

    return decorate
