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
    ("0.50", 6, 138),  # 138.89 unit/s: down, published as 0.4968
    ("3600", 0, 1),  # a 0-decimal token: exactly 1 unit/s
    ("3599", 0, 0),  # 0.9997 unit/s: below one unit (refused below)
    ("0.0036", 6, 1),
    ("0.003599", 6, 0),
    ("1.000000000000000001", 18, 277_777_777_777_777),  # ...777.7780 -> down
    ("123456789.123456789123456789", 18, 34_293_552_534_293_552_534_293),  # beyond float's 53 bits
])
def test_money__provider_price_rounds_down_to_a_whole_unit(price, decimals, units):
    if units == 0:
        with pytest.raises(PriceError, match="less than one unit"):
            price_units_per_second(Decimal(price), decimals)
        return
    assert price_units_per_second(Decimal(price), decimals) == units


def test_money__the_large_18_decimal_price_is_exact_where_float_is_not():
    price = Decimal("123456789.123456789123456789")
    exact = price_units_per_second(price, 18)
    # 123456789123456789123456789 / 3600 = 34293552534293552534293.5525: rounds down
    numerator = 123456789123456789123456789
    assert exact == numerator // 3600
    assert exact != int(float(price) * 10**18 / 3600)


@pytest.mark.parametrize("price", ["0.38", "0.50", "0.4535", "2.17", "1.000000000000000001", "0.0036"])
@pytest.mark.parametrize("decimals", [0, 6, 18])
def test_money__the_published_price_is_found_and_accepted_at_the_providers_own_figure(price, decimals):
    """What the provider wrote is what a renter types: the published hourly price is never above
    it (a `price<=` search finds the offer) and a `--max-price` of it accepts the offer."""
    try:
        units = price_units_per_second(Decimal(price), decimals)
    except PriceError:
        return  # below one unit per second of this token: refused at configuration
    shown = Decimal(format_tokens(units * 3600, decimals))
    assert shown <= Decimal(price)
    assert max_units_per_second(Decimal(price), decimals) >= units
    assert max_units_per_second(shown, decimals) == units  # the shown figure rents it too


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
