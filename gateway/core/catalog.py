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
        already_run: Callable[[ServedModel], bool] | None = None,
        cached: Callable[[ModelEntry], Schema | None] | None = None,
    ) -> None:
        """Resolve each name (built in, or declared in the configuration) and check the
        declaration (models.declare.check_entry: the module builds, its schema, its inputs
        run through it, its initial weights): a mistake stops the start with one line
        naming the model and key, before the data dir is touched. `already_run(served)`
        says a declaration's forward run can be skipped (its template was built from it);
        it is asked only once the module has built under check_entry's guard.

        `cached(entry)` is the schema a start that did all of that recorded for this
        very declaration, or None: with it nothing is built (no torch import); the
        module is compared with it later, by check_cached."""
        self._models: dict[str, ServedModel] = {}
        self._unchecked: dict[str, ServedModel] = {}
        for name in names:
            entry = registry.get(name, declared)
            schema = cached(entry) if cached is not None else None
            if schema is not None:
                self._models[name] = self._unchecked[name] = ServedModel(entry, schema)
                continue
            served = ServedModel(entry, check_entry(entry, run=False))
            if not (already_run and already_run(served)):
                check_entry(entry)
            self._models[name] = served

    def check_cached(self) -> dict[str, str]:
        """Build each module whose schema came from a cache (torch, on the meta device)
        and compare: model -> what is wrong, for each whose module no longer builds or
        gives another schema. Empty: every served schema is its module's."""
        wrong = {}
        for name, served in self._unchecked.items():
            try:
                check_entry(served.entry, run=False)
                schema = served.entry.schema()
            except ValueError as exc:
                wrong[name] = str(exc)
                continue
            if schema != served.schema:
                wrong[name] = (
                    f"model {name!r}: its module's schema is {schema.hash[:16]}, the cached "
                    f"one it is served with {served.schema.hash[:16]}"
                )
        self._unchecked = {}
        return wrong

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
