"""protocol/money.py: whole tokens per GPU-hour <-> integer units per GPU-second, exactly."""

from decimal import Decimal
from fractions import Fraction

import pytest

from protocol.money import (NATIVE_DECIMALS, PriceError, format_tokens, max_units_per_second,
                            price_units_per_second, tokens)


@pytest.mark.parametrize("price, decimals, units", [
    ("0.45", 6, 125),
    ("0.45", 18, 125 * 10**12),  # DAI: 10**12 times the USDC figure, not the same integer
    ("0.45", NATIVE_DECIMALS, 125 * 10**12),
    ("3.6", 6, 1_000),
    ("1800", 0, 1),  # a 0-decimal token: 0.5 unit/s rounds half up to 1
    ("0.0018", 6, 1),  # 1800 units/h = 0.5 unit/s: halves up
    ("0.001799", 6, 0),  # 0.49972 unit/s: below one unit (refused below)
    ("1.000000000000000001", 18, 277_777_777_777_778),  # ...777.7780 -> up
    ("123456789.123456789123456789", 18, 34_293_552_534_293_552_534_294),  # beyond float's 53 bits
])
def test_money__provider_price_rounds_to_the_nearest_unit_halves_up(price, decimals, units):
    if units == 0:
        with pytest.raises(PriceError, match="less than one unit"):
            price_units_per_second(Decimal(price), decimals)
        return
    assert price_units_per_second(Decimal(price), decimals) == units


def test_money__the_large_18_decimal_price_is_exact_where_float_is_not():
    price = Decimal("123456789.123456789123456789")
    exact = price_units_per_second(price, 18)
    # 123456789123456789123456789 / 3600 = 34293552534293552534293.5525: rounds up
    numerator = 123456789123456789123456789
    assert exact == (2 * numerator + 3600) // 7200  # floor(n/3600 + 1/2)
    assert exact != round(float(price) * 10**18 / 3600)


def test_money__a_renters_ceiling_rounds_down():
    assert max_units_per_second(Decimal("0.45"), 6) == 125
    assert max_units_per_second(Decimal("0.4535"), 6) == 125  # 125.97: never more than written
    assert max_units_per_second(Decimal("0.45"), 18) == 125 * 10**12
    with pytest.raises(PriceError, match="below the smallest"):
        max_units_per_second(Decimal("0.0035"), 6)  # 0.97 unit/s


@pytest.mark.parametrize("bad", ["0", "-1", "NaN", "Infinity"])
def test_money__non_positive_or_non_finite_prices_are_refused(bad):
    with pytest.raises(PriceError):
        price_units_per_second(Decimal(bad), 6)


def test_money__decimals_outside_0_to_36_are_refused():
    with pytest.raises(PriceError):
        price_units_per_second(Decimal("1"), 37)


def test_money__display_is_exact():
    assert format_tokens(125 * 3600, 6) == "0.45"
    assert format_tokens(125 * 10**12 * 3600, 18) == "0.45"
    assert format_tokens(1, 18) == "0.000000000000000001"
    assert format_tokens(10**40 + 1, 18) == "10000000000000000000000.000000000000000001"  # 41 digits
    assert format_tokens(5, 0) == "5"
    assert Fraction(tokens(10**40 + 1, 18)) * 10**18 == 10**40 + 1  # no context rounding
