"""Reward functions by name: the built-in registry, or `module.path:function` for the user's own.

Every reward follows the TRL convention `fn(completions, prompts, **columns) -> list[float]`, one
float per completion; `columns` holds the dataset's other columns, one value per completion.
A registered class is a reward whose options (a regex, sandbox limits) are checked once, when it
is built from the config; a function's options are bound as keyword arguments.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Protocol


class RewardFn(Protocol):
    def __call__(self, completions: list[str], prompts: list[str], **columns) -> list[float]: ...


REWARDS: dict[str, Callable] = {}


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Decorator that makes a reward function (or class) available to configs by `name`."""

    def register(target: Callable) -> Callable:
        if name in REWARDS:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = target
        return target

    return register


def resolve_reward(spec: str) -> Callable:
    """The function or class that `spec` names: a registry name or `module.path:attribute`."""
    if ":" not in spec:
        if spec not in REWARDS:
            raise ValueError(
                f"unknown reward {spec!r}: registered rewards are {sorted(REWARDS)}; "
                "name your own as 'module.path:function'"
            )
        return REWARDS[spec]
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {error}") from error
    target = getattr(module, attribute, None)
    if target is None or not callable(target):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return target


def build_reward(spec: str, options: dict | None = None) -> RewardFn:
    """A ready reward: a class is instantiated with `options`, a function gets them bound."""
    target = resolve_reward(spec)
    options = dict(options or {})
    if inspect.isclass(target):
        try:
            return target(**options)
        except TypeError as error:
            raise ValueError(f"reward {spec!r}: bad options {sorted(options)}: {error}") from error
    if not options:
        return target
    # Only named parameters count: `**columns` would swallow a misspelt option without a word.
    named = {
        name for name, parameter in inspect.signature(target).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(options) - named)
    if unknown:
        raise ValueError(f"reward {spec!r} does not take options {unknown} (its parameters: {sorted(named)})")
    return functools.partial(target, **options)
