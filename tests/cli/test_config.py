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
