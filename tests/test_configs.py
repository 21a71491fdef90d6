import json
import math

import pytest

from cached_diffusers import (
    NoCacheConfig,
    TeaCacheConfig,
    available_cache_methods,
    cache_config_from_dict,
    make_cache_config,
)
from cached_diffusers.configs import resolve_cache_config


def test_teacache_defaults_and_round_trip_through_json():
    config = TeaCacheConfig(rel_l1_thresh=0.35, coefficients=[1, 2, 3, 4, 5], max_continuous_cached_steps=3)
    assert config.coefficients == (1.0, 2.0, 3.0, 4.0, 5.0)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "teacache"
    assert data["coefficients"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    again = cache_config_from_dict(data)
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_teacache_positional_threshold_and_defaults():
    config = TeaCacheConfig(0.4)
    assert config.rel_l1_thresh == 0.4
    assert config.coefficients is None
    assert config.compute_last_step is True
    assert config.max_warmup_steps == 0
    assert config.max_cached_steps is None and config.max_continuous_cached_steps is None


def test_config_is_a_value():
    config = TeaCacheConfig(0.3)
    with pytest.raises(AttributeError):
        config.rel_l1_thresh = 0.5
    assert config.replace(rel_l1_thresh=0.5).rel_l1_thresh == 0.5
    assert config == TeaCacheConfig(0.3) and hash(config) == hash(TeaCacheConfig(0.3))


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.2", True, None])
def test_bad_threshold_names_field_and_range(bad):
    with pytest.raises(ValueError, match=r"rel_l1_thresh must be a finite number > 0"):
        TeaCacheConfig(rel_l1_thresh=bad)


@pytest.mark.parametrize("coefficients", [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], []])
def test_wrong_number_of_coefficients(coefficients):
    with pytest.raises(ValueError, match=r"coefficients must have exactly 5 numbers"):
        TeaCacheConfig(coefficients=coefficients)


def test_non_numeric_coefficients():
    with pytest.raises(ValueError, match=r"coefficients\[2\] must be a finite number"):
        TeaCacheConfig(coefficients=[1, 2, "x", 4, 5])
    with pytest.raises(ValueError, match=r"coefficients must be a sequence of 5 numbers"):
        TeaCacheConfig(coefficients="12345")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_warmup_steps", -1, r"max_warmup_steps must be an integer >= 0"),
        ("max_warmup_steps", 1.5, r"max_warmup_steps must be an integer >= 0"),
        ("max_cached_steps", -1, r"max_cached_steps must be an integer >= 0 or None"),
        ("max_continuous_cached_steps", 0, r"max_continuous_cached_steps must be an integer >= 1 or None"),
        ("compute_last_step", 1, r"compute_last_step must be True or False"),
    ],
)
def test_bad_guards(field, value, message):
    with pytest.raises(ValueError, match=message):
        TeaCacheConfig(**{field: value})


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown cache method 'fastcache'; valid methods: .*teacache"):
        cache_config_from_dict({"method": "fastcache"})
    with pytest.raises(ValueError, match=r"unknown cache method"):
        make_cache_config("nope")


def test_unknown_field_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=r"unknown field\(s\) rel_l1_threshold for cache method 'teacache'"):
        cache_config_from_dict({"method": "teacache", "rel_l1_threshold": 0.2})


def test_missing_method_key():
    with pytest.raises(ValueError, match=r"needs a 'method' key"):
        cache_config_from_dict({"rel_l1_thresh": 0.2})


def test_none_means_no_caching():
    assert cache_config_from_dict(None) is None
    assert cache_config_from_dict({"method": "none"}) is None
    assert make_cache_config("none") is None
    assert resolve_cache_config(None) is None
    assert resolve_cache_config("none") is None
    assert resolve_cache_config(NoCacheConfig()) is None
    assert NoCacheConfig().to_dict() == {"method": "none"}


def test_resolve_accepts_names_dicts_and_aliases():
    assert resolve_cache_config("teacache") == TeaCacheConfig()
    assert resolve_cache_config("TeaCache") == TeaCacheConfig()
    assert resolve_cache_config({"method": "tea_cache", "rel_l1_thresh": 0.5}) == TeaCacheConfig(0.5)
    with pytest.raises(ValueError, match=r"cache_config must be a CacheConfig"):
        resolve_cache_config(0.2)


def test_registry_lists_canonical_names():
    methods = available_cache_methods()
    assert "teacache" in methods and "none" in methods
    assert "tea_cache" not in methods
