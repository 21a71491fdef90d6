"""Shared pytest configuration: the ``slow`` marker (tests over 20 s; ``-m "not slow"`` leaves them out)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than 20 s (deselect with -m 'not slow')")
