"""transformers' and peft's classes, resolved under one lock: their lazy first imports are not thread-safe.

AutoTokenizer = transformers_class("AutoTokenizer")
PeftModel = peft_class("PeftModel")
"""

from __future__ import annotations

import threading
from typing import Any

_IMPORTING = threading.Lock()


def transformers_class(name: str) -> Any:
    """`transformers.<name>` (AutoTokenizer, AutoModelForCausalLM, ...) resolved under a lock: the library's lazy first
    import is not thread-safe (two threads asking at once, one gets ImportError), and the web app plans, counts tokens
    and loads models on threads of one process."""
    with _IMPORTING:
        import transformers

        return getattr(transformers, name)


def peft_class(name: str) -> Any:
    """`peft.<name>` (PeftModel, ...) under the same lock: importing peft resolves transformers' lazy names too, so it
    must not run while another thread resolves one."""
    with _IMPORTING:
        import peft

        return getattr(peft, name)
