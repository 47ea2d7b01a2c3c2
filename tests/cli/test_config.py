"""The configuration file's checks that protect what a node publishes."""

import pytest

from node.config import ConfigError, load_config


@pytest.mark.parametrize("region, ok", [
    ("eu-frankfurt", True), ("us east 1", True), ("eu\u2011west", False), ("eu\tx", False),
    ("x" * 33, False),
])
def test_config__region_must_be_wire_text(tmp_path, region, ok):
    path = tmp_path / "config.toml"
    path.write_text(f'[provider]\nregion = "{region}"\n'.replace("\t", "\\t"))
    if ok:
        assert load_config(path).provider.region == region
    else:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert "printable ASCII" in str(err.value)


def test_config__the_provider_section_is_the_one_source_of_provider_settings(tmp_path):
    """The node's settings derive from the [provider] section, defaults included (they once
    diverged: min_duration_s 600 in the file, 60 in the node)."""
    import dataclasses
    from decimal import Decimal

    from node.config import ProviderSection
    from node.node import ProviderSettings

    path = tmp_path / "config.toml"
    path.write_text('[provider]\nenabled = true\nprice_per_gpu_hour = "0.450000000000003600"\n')
    section = load_config(path).provider
    settings = ProviderSettings.from_section(section)
    assert settings.price_per_gpu_hour == Decimal("0.450000000000003600")  # exact, no float
    defaults = ProviderSection()
    shared = {f.name for f in dataclasses.fields(ProviderSettings)} & {
        f.name for f in dataclasses.fields(ProviderSection)} - {"price_per_gpu_hour", "access_hook"}
    assert shared >= {"min_duration_s", "max_duration_s", "heartbeat_interval_s", "grace_s", "region"}
    for name in shared:
        assert getattr(settings, name) == getattr(defaults, name) == getattr(ProviderSettings(), name)
    assert settings.min_duration_s == 600
    # the written default file reads back as the defaults
    from node.config import default_config_text

    path.write_text(default_config_text(tmp_path, provider=True))
    assert load_config(path).provider == dataclasses.replace(defaults, enabled=True)


@pytest.mark.parametrize("text, why", [
    ("min_duration_s = 700\nmax_duration_s = 600", "min_duration_s: above max_duration_s"),
    ('price_per_gpu_hour = "0.4"\nmin_price_per_gpu_hour = "0.5"', "min_price_per_gpu_hour: above"),
    ("heartbeat_interval_s = 0", "heartbeat_interval_s: must be positive"),
    ('price_per_gpu_hour = "-1"', "price_per_gpu_hour: must be positive"),
    ('price_per_gpu_hour = "abc"', "not a number"),
])
def test_config__provider_values_are_checked_once_on_load(tmp_path, text, why):
    path = tmp_path / "config.toml"
    path.write_text(f"[provider]\n{text}\n")
    with pytest.raises(ConfigError, match=why):
        load_config(path)


def test_config__a_price_below_one_unit_per_second_is_a_configuration_error():
    from decimal import Decimal

    from node.node import ProviderSettings

    settings = ProviderSettings(price_per_gpu_hour=Decimal("0.001"))  # 0.28 units/s at 6 decimals
    with pytest.raises(ConfigError, match="less than one unit"):
        settings.prices(6)
    assert settings.prices(18) == (277_777_777_777, 277_777_777_777)  # 277777777777.78, down


def test_config__interruptible_and_power_keys_reach_the_node(tmp_path):
    from decimal import Decimal

    from node.node import ProviderSettings
    from node.spot import SpotSettings

    path = tmp_path / "config.toml"
    path.write_text('[provider]\nprice_per_gpu_hour = "0.45"\ninterruptible_gpus = 2\n'
                    'interruptible_notice_s = 120\ninterruptible_price_per_gpu_hour = "0.30"\n'
                    'power_price_source = "http://127.0.0.1:8080/price"\npower_poll_s = 30\n'
                    'curtail_above_per_mwh = 250\nresume_below_per_mwh = "-5.5"\n')
    spot = ProviderSettings.from_section(load_config(path).provider).spot
    assert spot == SpotSettings(2, 120, Decimal("0.30"), "http://127.0.0.1:8080/price", 30.0,
                                Decimal(250), Decimal("-5.5"))
    plain = tmp_path / "plain.toml"
    plain.write_text('[provider]\nprice_per_gpu_hour = "0.45"\n')
    assert ProviderSettings.from_section(load_config(plain).provider).spot is None


@pytest.mark.parametrize("text, why", [
    ('interruptible_gpus = 1\n', "interruptible price"),
    ('power_price_source = "prices.csv"\ncurtail_above_per_mwh = 100\n', "resume_below_per_mwh"),
    ('power_price_source = "p.csv"\ncurtail_above_per_mwh = 100\nresume_below_per_mwh = 100\n', "hysteresis"),
])
def test_config__bad_interruptible_settings_fail_on_load(tmp_path, text, why):
    from node.node import ProviderSettings

    path = tmp_path / "config.toml"
    path.write_text("[provider]\n" + text)
    with pytest.raises(ConfigError) as err:
        ProviderSettings.from_section(load_config(path).provider)
    assert why in str(err.value)
def test_config__relay_section_keys_defaults_and_errors(tmp_path):
    from node.config import default_config_text
    from node.reachability import ReachabilityConfig

    path = tmp_path / "config.toml"
    path.write_text(default_config_text(tmp_path))
    assert ReachabilityConfig(**load_config(path).relay) == ReachabilityConfig()  # the defaults
    path.write_text('[relay]\nmax_circuits_per_peer = 2\ncircuit_max_seconds = 600\n')
    got = ReachabilityConfig(**load_config(path).relay)
    assert (got.max_circuits_per_peer, got.circuit_max_seconds) == (2, 600)
    for text, why in (('[relay]\nrelay_service = "maybe"\n', "one of auto, on, off"),
                      ("[relay]\nmax_circuits = 0\n", "max_circuits: must be positive"),
                      ("[relay]\ncircuits = 3\n", "unknown key 'circuits'")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_config(path)


def test_config__discovery_section_keys_defaults_and_errors(tmp_path):
    from node.config import default_config_text
    from node.discovery import DiscoveryConfig

    path = tmp_path / "config.toml"
    path.write_text(default_config_text(tmp_path))
    assert DiscoveryConfig(**load_config(path).discovery) == DiscoveryConfig()  # the defaults
    path.write_text('[discovery]\ntarget_peers = 20\ninterval_s = 60\nallow_private = true\n')
    got = DiscoveryConfig(**load_config(path).discovery)
    assert (got.target_peers, got.interval_s, got.allow_private) == (20, 60.0, True)
    assert isinstance(got.interval_s, float)
    for text, why in (("[discovery]\ninterval_s = 0\n", "discovery: interval_s: must be positive"),
                      ("[discovery]\ndials_per_round = -1\n", "dials_per_round: must be >= 0"),
                      ("[discovery]\nretry_s = -5\n", "retry_s: must be >= 0"),
                      ('[discovery]\ntarget_peers = "8"\n', r"discovery.target_peers: expected int"),
                      ("[discovery]\nenabled = 1\n", "discovery.enabled: expected bool"),
                      ("[discovery]\ntarget = 3\n", "unknown key 'target'")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_config(path)


def test_config__several_interruptible_sets_reach_the_node(tmp_path):
    from decimal import Decimal

    from node.config import InterruptibleSet
    from node.node import ProviderSettings

    path = tmp_path / "config.toml"
    path.write_text('[provider]\nprice_per_gpu_hour = "0.45"\n'
                    '[[provider.interruptible]]\ngpus = 2\nnotice_s = 60\nprice_per_gpu_hour = "0.30"\n'
                    '[[provider.interruptible]]\ngpus = 1\nnotice_s = 600\nprice_per_gpu_hour = 0.38\n')
    spot = ProviderSettings.from_section(load_config(path).provider).spot
    assert spot.all_sets == (InterruptibleSet(2, 60, Decimal("0.30")),
                             InterruptibleSet(1, 600, Decimal("0.38")))


SET = '[[provider.interruptible]]\ngpus = 1\nnotice_s = {n}\nprice_per_gpu_hour = "0.3"\n'


@pytest.mark.parametrize("text, why", [
    ('[[provider.interruptible]]\ngpus = 1\nnotice_s = 60\n', r"provider.interruptible\[0\]: missing price_per_gpu_hour"),
    ('[[provider.interruptible]]\ngpu = 1\n', r"provider.interruptible\[0\]: unknown key 'gpu'"),
    ('[[provider.interruptible]]\ngpus = 0\nnotice_s = 60\nprice_per_gpu_hour = "0.3"\n',
     r"provider.interruptible\[0\].gpus: must be at least 1"),
    ('[[provider.interruptible]]\ngpus = 1\nnotice_s = "60"\nprice_per_gpu_hour = "0.3"\n',
     r"provider.interruptible\[0\].notice_s: expected int"),
    ('[[provider.interruptible]]\ngpus = 1\nnotice_s = 60\nprice_per_gpu_hour = "cheap"\n',
     r"price_per_gpu_hour: 'cheap' is not a number"),
    ('[[provider.interruptible]]\ngpus = 1\nnotice_s = 60\nprice_per_gpu_hour = "nan"\n',
     r"price_per_gpu_hour: 'nan' is not a number"),
    (SET.format(n=60) + SET.format(n=60), r"provider.interruptible\[1\].notice_s: 60 is already another set's notice"),
    ("".join(SET.format(n=n) for n in range(1, 10)), "9 sets, at most 8"),
    ('interruptible = 3\n', "provider.interruptible: expected list"),
])
def test_config__bad_interruptible_sets_fail_on_load_with_where_and_why(tmp_path, text, why):
    path = tmp_path / "config.toml"
    path.write_text('[provider]\nprice_per_gpu_hour = "0.45"\n' + text)
    with pytest.raises(ConfigError, match=why):
        load_config(path)


def test_config__one_set_shorthand_and_tables_together_refused(tmp_path):
    from node.node import ProviderSettings

    path = tmp_path / "config.toml"
    path.write_text('[provider]\nprice_per_gpu_hour = "0.45"\ninterruptible_gpus = 1\n'
                    'interruptible_price_per_gpu_hour = "0.3"\n' + SET.format(n=60))
    with pytest.raises(ConfigError, match="use one or the other"):
        ProviderSettings.from_section(load_config(path).provider)
