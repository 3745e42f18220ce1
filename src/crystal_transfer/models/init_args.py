"""Constructor arguments captured once, so a saved model is rebuilt from its card without a hand-kept copy."""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def records_init_args(cls: T) -> T:
    """Class decorator: ``instance.init_args`` is the JSON form of the arguments its constructor was called with,
    defaults filled in, so that ``cls(**instance.init_args)`` rebuilds the same architecture."""
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        arguments = {name: value for name, value in bound.arguments.items() if name != "self"}
        self._init_args = json.loads(json.dumps(arguments))  # JSON types only (tuples become lists)

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), a copy."""
        return json.loads(json.dumps(self._init_args))

    cls.__init__ = __init__
    cls.init_args = property(init_args)
    return cls
