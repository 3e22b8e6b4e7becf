"""The loop's flags, each checked against its range before anything runs (`r2m.R2MConfig.validate` calls this):
one line naming the flag, its range and the value given. A number's range check also rejects NaN and inf."""

from __future__ import annotations

import math
from typing import Collection, Optional


def check_ranges(cfg, at_least: dict[str, float], more_than: dict[str, float], within: dict[str, tuple[float, float]],
                 choices: dict[str, Collection[str]], finite_or_none: tuple[str, ...] = ()) -> None:
    """ValueError for the first flag of `cfg` (any object with those attributes) out of its range:
    at_least {name: lowest allowed}, more_than {name: a bound it must exceed}, within {name: (lo, hi)} inclusive,
    choices {name: allowed words}, finite_or_none: names that may be None but not NaN or inf."""
    for name, options in choices.items():
        value = getattr(cfg, name)
        if value not in options:
            raise ValueError(f"--{name} must be one of {sorted(options)}, got {value!r}")
    for name, lowest in {**at_least, **more_than}.items():
        value, strict = getattr(cfg, name), name in more_than
        if not (lowest < value if strict else lowest <= value) or not value < math.inf:  # `not lo <= x`: NaN too
            raise ValueError(f"--{name} must be a finite number {'>' if strict else '>='} {lowest:g}, got {value}")
    for name, (lo, hi) in within.items():
        value = getattr(cfg, name)
        if not lo <= value <= hi:
            raise ValueError(f"--{name} must lie in [{lo:g}, {hi:g}], got {value}")
    for name in finite_or_none:
        value: Optional[float] = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be finite, got {value}")
