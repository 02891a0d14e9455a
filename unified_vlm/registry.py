"""Named registries for swappable components (in the spirit of timm's ``register_model``).

Each registry maps a name to a factory. ``create(name, **kwargs)`` builds the component and
fails with the close matches when the name is unknown, so a typo in a YAML config is caught
at construction time with a message that says what to change.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Dict, Iterable, List


class Registry:
    """A name -> factory mapping with helpful errors.

    Factories are plain callables (classes or functions). ``create`` passes keyword arguments
    through; an argument the factory does not take raises ``TypeError`` naming the argument
    and the accepted ones, rather than being silently dropped.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._docs: Dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not factory:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            summary = doc or (inspect.getdoc(factory) or "").split("\n")[0]
            self._docs[name] = summary
            return factory

        return decorator

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        params = inspect.signature(factory).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                accepted = [k for k in params if k != "self"]
                raise TypeError(
                    f"{self.kind} {name!r} does not take option(s) {unknown}; it accepts {accepted}"
                )
        return factory(**kwargs)

    def list(self, pattern: str = "*") -> List[str]:
        return [n for n in sorted(self._entries) if fnmatch.fnmatch(n, pattern)]

    def describe(self) -> Iterable[tuple[str, str]]:
        for name in sorted(self._entries):
            yield name, self._docs.get(name, "")


ENCODERS = Registry("encoder")
QUANTIZERS = Registry("quantizer")
PROJECTORS = Registry("projector")
HEADS = Registry("head")
BACKBONES = Registry("backbone")

ALL_REGISTRIES = {
    "encoders": ENCODERS,
    "quantizers": QUANTIZERS,
    "projectors": PROJECTORS,
    "heads": HEADS,
    "backbones": BACKBONES,
}
