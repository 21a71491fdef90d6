"""Sizes a file can set are bounded, and SCM masks are built only as far as the run's step count.

A ``cache_config.json`` with ``{"compute_bins": [1000000000000], "cache_bins": [1]}`` used to load and then end the
first call in a bare ``MemoryError``: the mask was built in full before being cut to the step count.
"""

from __future__ import annotations

import json

import pytest

from cached_diffusers import DBCacheConfig, LeMiCaConfig, cache_config_from_dict
from cached_diffusers.hub import read_cache_config
from cached_diffusers.scm import steps_mask
from cached_diffusers.validation import MAX_STEPS


def test_huge_bins_in_a_cache_config_file_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "cache_config.json"
    path.write_text(json.dumps({"method": "fbcache", "scm_steps_mask": {"compute_bins": [10**12], "cache_bins": [1]}}))
    with pytest.raises(ValueError, match=rf"{path}.*scm_steps_mask.*at most {MAX_STEPS} steps"):
        read_cache_config(path)


def test_a_huge_explicit_mask_is_refused():
    with pytest.raises(ValueError, match=rf"at most {MAX_STEPS} entries"):
        DBCacheConfig(scm_steps_mask=[1] + [0] * MAX_STEPS)


def test_a_planned_schedule_step_count_is_bounded():
    with pytest.raises(ValueError, match=rf"num_inference_steps must be an integer in \[2, {MAX_STEPS}\]"):
        cache_config_from_dict({"method": "lemica", "computed_steps": [0, 10**12 - 1], "num_inference_steps": 10**12})
    assert LeMiCaConfig(computed_steps=(0, MAX_STEPS - 1), num_inference_steps=MAX_STEPS).budget == 2


def test_bins_are_built_only_to_the_step_count(monkeypatch):
    """The largest bins allowed build no more entries than the run has steps."""
    import cached_diffusers.scm as scm

    built = []
    original = scm._interleave

    def spy(*args, **kwargs):
        mask = original(*args, **kwargs)
        built.append(len(mask))
        return mask

    monkeypatch.setattr(scm, "_interleave", spy)
    mask = steps_mask({"compute_bins": [MAX_STEPS - 1], "cache_bins": [1]}, 20)
    assert mask == (1,) * 20 and built == [20]
    # cut to the step count exactly as before: 4 ones, 2 zeros, 2 ones, 3 zeros (last step computed)
    assert steps_mask({"compute_bins": [4, 2], "cache_bins": [2, 3]}, 10) == (1, 1, 1, 1, 0, 0, 1, 1, 0, 1)
    # bins shorter than the run are still resampled to it
    assert len(steps_mask({"compute_bins": [2], "cache_bins": [1]}, 9)) == 9
