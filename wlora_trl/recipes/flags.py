"""Reading the recipes' flags as the config reads its fields."""

from __future__ import annotations


def config_number(value: str | int | float, name: str) -> int | float:
    """A count-or-fraction flag as the config reads it: '3' -> 3 (a count), '0.5' and '1.0' -> floats (fractions);
    numbers from a YAML --config are already typed."""
    if isinstance(value, (int, float)):
        return value
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{name} {value!r}: pass a whole number (a count) or a decimal (a fraction).") from None
