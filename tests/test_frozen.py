"""fast_init builds the same values as the dataclass's own __init__, only faster."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from llm_batch_queue._frozen import fast_init
from llm_batch_queue.jobs import AttemptResult, Job, JobStatus


def _value_class(fast: bool) -> Any:
    """The same frozen dataclass, with its own __init__ or with fast_init's."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class Value:
        a: int
        b: str = "b"
        c: list[int] = dataclasses.field(default_factory=list)
        d: float = dataclasses.field(default=1.5, kw_only=True)
        e: int = dataclasses.field(default=0, kw_only=True)

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("a must not be negative")

    return fast_init(Value) if fast else Value


Plain, Fast = _value_class(False), _value_class(True)


CALLS: list[tuple[tuple[object, ...], dict[str, object]]] = [
    ((1,), {}),
    ((1, "x"), {}),
    ((1, "x", [2]), {"d": 2.5}),
    ((), {"a": 3, "e": 7}),
    ((4,), {"c": [1, 2], "b": "y"}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_it_builds_what_the_dataclass_init_builds(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    plain, fast = Plain(*args, **kwargs), Fast(*args, **kwargs)
    assert dataclasses.asdict(fast) == dataclasses.asdict(plain)
    assert repr(fast) == repr(plain)
    assert type(fast).__init__ is not type(plain).__init__


def test_the_signature_and_its_errors_are_the_dataclass_ones() -> None:
    fast_params = inspect.signature(Fast).parameters
    plain_params = inspect.signature(Plain).parameters
    assert [(p.name, p.kind) for p in fast_params.values()] == [
        (p.name, p.kind) for p in plain_params.values()
    ]
    with pytest.raises(TypeError):
        Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, "x", [], 2.5)  # type: ignore[misc]  # d is keyword-only
    with pytest.raises(ValueError, match="must not be negative"):
        Fast(-1)  # __post_init__ still runs


def test_a_default_factory_gives_each_value_its_own_object() -> None:
    first, second = Fast(1), Fast(2)
    first.c.append(9)
    assert second.c == []


def test_the_value_stays_frozen_hashable_and_replaceable() -> None:
    value = Fast(1, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.a = 2  # type: ignore[misc]
    assert dataclasses.replace(value, a=5) == Fast(5, "x")
    assert Fast(1, "x", [], d=1.5) == value


def test_the_library_values_use_it() -> None:
    job = Job("j", "r", "i", "s", JobStatus.READY, 0, 0, 3, 1.0, 0, None, 0, None, 0.0)
    assert Job.__init__.__qualname__ == "Job.__init__"
    assert dataclasses.replace(job, attempts=1).attempts == 1
    assert AttemptResult(started_at=1.0, finished_at=2.0).counted is True


def test_it_refuses_what_it_cannot_speed_up() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived:
        a: int
        b: int = dataclasses.field(default=0, init=False)

    for cls in (NoSlots, NotFrozen, Derived, int):
        with pytest.raises(TypeError):
            fast_init(cls)
