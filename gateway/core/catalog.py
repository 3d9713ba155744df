"""The models this gateway serves, resolved once at start: registry entry plus schema."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from sluice.gateway.core.errors import NotFound, bounded
from sluice.models import registry
from sluice.models.declare import check_entry
from sluice.models.entry import ModelEntry
from sluice.models.schema import Schema


@dataclass(frozen=True)
class ServedModel:
    entry: ModelEntry
    schema: Schema

    @property
    def name(self) -> str:
        return self.entry.name


class Catalog:
    def __init__(
        self,
        names: Iterable[str],
        declared: Mapping[str, ModelEntry] | None = None,
        already_run: Callable[[ModelEntry], bool] | None = None,
    ) -> None:
        """Resolve each name (built in, or declared in the configuration) and check that
        the module builds and runs on its declared inputs (models.declare.check_entry):
        a mistake stops the start with one line naming it. `already_run(entry)` says a
        declaration's forward run can be skipped (its template was built from it)."""
        self._models: dict[str, ServedModel] = {}
        for name in names:
            entry = registry.get(name, declared)
            check_entry(entry, run=not (already_run and already_run(entry)))
            self._models[name] = ServedModel(entry, entry.schema())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self._models) or "none"
            raise NotFound(
                f"model {bounded(name)!r} is not served here; served: {served}"
            ) from None
