"""Money: prices and deposits, exact.

On the wire and on chain every amount is an integer in the token's smallest unit (a price is
units per GPU-second). People write and read whole token units per GPU-hour ("0.50" USDC).
The two meet only here, with exact arithmetic (`Fraction`, never `float`), and the number of
decimals always comes from the token contract's `decimals()` (the native coin: 18), never from
a constant: a price of 0.50 is 500_000 units per hour in USDC (6) and 5 * 10**17 in DAI (18).

Rounding (specs/node.md, "Prices: whole tokens and units"):
- a provider's configured hourly price becomes units per GPU-second rounded down
  (`price_units_per_second`): the advertised hourly price, exactly that integer * 3600 units,
  is never above what the provider wrote, so a renter who searches `price<=` or rents with
  `--max-price` at the provider's own figure finds and accepts it. A price below one unit per
  second is refused, not raised to one.
- a renter's ceiling (`--max-price`) rounds down (`max_units_per_second`): the node never
  agrees to pay more per second than the renter wrote.
- display (`tokens`) is exact: units / 10**decimals as a Decimal, never rounded.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

NATIVE_DECIMALS = 18  # the chain's native coin (wei)
MAX_TOKEN_DECIMALS = 36  # the most an offer may name (validation) and a chain read may report
SECONDS_PER_HOUR = 3600


class PriceError(ValueError):
    """A price that no integer number of the token's units per second can carry."""


def _per_second(per_gpu_hour: Decimal | str | int, decimals: int) -> Fraction:
    if not 0 <= decimals <= MAX_TOKEN_DECIMALS:
        raise PriceError(f"token decimals {decimals} outside 0..{MAX_TOKEN_DECIMALS}")
    value = Decimal(per_gpu_hour) if not isinstance(per_gpu_hour, Decimal) else per_gpu_hour
    if not value.is_finite() or value <= 0:
        raise PriceError(f"price {per_gpu_hour} must be a positive number")
    return Fraction(value) * 10**decimals / SECONDS_PER_HOUR


def price_units_per_second(per_gpu_hour: Decimal | str | int, decimals: int) -> int:
    """A provider's price per GPU-hour in whole tokens -> units per GPU-second, rounded down
    (the published hourly price never exceeds the configured one); PriceError when that is
    zero units."""
    units = int(_per_second(per_gpu_hour, decimals))  # floor for x > 0
    if units < 1:
        raise PriceError(f"{per_gpu_hour} per GPU-hour is less than one unit per second of a "
                         f"{decimals}-decimal token (the least is {tokens(SECONDS_PER_HOUR, decimals)})")
    return units


def max_units_per_second(per_gpu_hour: Decimal | str | int, decimals: int) -> int:
    """A renter's highest price per GPU-hour in whole tokens -> units per GPU-second, rounded
    down; PriceError when that is zero units."""
    units = int(_per_second(per_gpu_hour, decimals))  # floor for x > 0
    if units < 1:
        raise PriceError(f"{per_gpu_hour} per GPU-hour is below the smallest price unit of a "
                         f"{decimals}-decimal token")
    return units


def tokens(units: int, decimals: int) -> Decimal:
    """`units` of a token with `decimals` as whole tokens, exactly (no context rounding)."""
    return Decimal(f"{int(units)}e-{decimals}")


def format_tokens(units: int, decimals: int) -> str:
    """Exact whole-token text without an exponent or trailing zeros: 500000, 6 -> "0.5"."""
    text = format(tokens(units, decimals), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
