"""settings and command: the environment, the flags, and the errors when they are wrong."""

from __future__ import annotations

import argparse

import pytest
from operator_samples import SOURCE

from niximage_operator import command
from niximage_operator.settings import OperatorSettings

REQUIRED = {
    "NIXIMAGE_OPERATOR_STORAGE": "gs://bucket/images",
    "NIXIMAGE_OPERATOR_REGISTRY": "registry.example:5000",
    "NIXIMAGE_OPERATOR_BUILDER_IMAGE": "ghcr.io/example/niximage:1",
    "NIXIMAGE_OPERATOR_DEFAULT_PACKAGE_SOURCE": SOURCE,
}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_settings_come_from_the_environment(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("NIXIMAGE_OPERATOR_NAMESPACES", "team-a, team-b")
    environment.setenv("NIXIMAGE_OPERATOR_BUILDER_RESOURCES", '{"limits": {"memory": "8Gi"}}')
    environment.setenv("NIXIMAGE_OPERATOR_MAX_CONCURRENT_BUILDS", "9")
    environment.setenv("NIXIMAGE_OPERATOR_NIX_STORE_VOLUME", '{"emptyDir": {}}')
    config = OperatorSettings()  # type: ignore[call-arg]
    assert config.storage == "gs://bucket/images"
    assert config.namespaces == ["team-a", "team-b"]
    assert config.builder_resources == {"limits": {"memory": "8Gi"}}
    assert config.max_concurrent_builds == 9
    assert config.nix_store_volume == {"emptyDir": {}}
    assert config.builder_command == ["niximage"]


def test_gc_schedule_is_off_unless_given(environment: pytest.MonkeyPatch) -> None:
    config = OperatorSettings()  # type: ignore[call-arg]
    assert config.gc_interval is None and config.gc_grace == 3600
    environment.setenv("NIXIMAGE_OPERATOR_GC_INTERVAL", "24h")
    environment.setenv("NIXIMAGE_OPERATOR_GC_GRACE", "90m")
    config = OperatorSettings()  # type: ignore[call-arg]
    assert (config.gc_interval, config.gc_grace) == (86400, 5400)
    environment.setenv("NIXIMAGE_OPERATOR_GC_INTERVAL", "")
    assert OperatorSettings().gc_interval is None  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GC_INTERVAL", "daily", "invalid duration 'daily'"),
        ("GC_GRACE", "0", "greater than 0"),
        ("BUILDER_VOLUME_MOUNTS", '[{"name": "x", "mountPath": "/x"}]', "one of builder_volumes"),
        ("BUILDER_USER", "0", "greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_variable(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    environment.setenv(f"NIXIMAGE_OPERATOR_{variable}", value)
    assert command.run(parse()) == command.EXIT_CONFIGURATION
    error = capsys.readouterr().err
    assert message in error and f"$NIXIMAGE_OPERATOR_{variable}" in error


def test_flags_win_over_the_environment(environment: pytest.MonkeyPatch) -> None:
    resources = '{"requests": {"cpu": "2"}}'
    flags = ["--registry", "other:443", "--namespace", "x", "--namespace", "y"]
    args = parse(*flags, "--max-concurrent-builds", "2", "--builder-resources", resources)
    config = command.settings_from(args)
    assert config.registry == "other:443"
    assert config.namespaces == ["x", "y"]
    assert config.max_concurrent_builds == 2
    assert config.builder_resources == {"requests": {"cpu": "2"}}
    assert config.storage == "gs://bucket/images"


def test_missing_settings_name_the_variable_and_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in REQUIRED:
        monkeypatch.delenv(name, raising=False)
    assert command.run(parse("--storage", "/srv/images")) == command.EXIT_CONFIGURATION
    error = capsys.readouterr().err
    assert "$NIXIMAGE_OPERATOR_REGISTRY or --registry" in error
    assert "$NIXIMAGE_OPERATOR_BUILDER_IMAGE or --builder-image" in error
    assert "STORAGE" not in error


def test_bad_values_are_refused(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("NIXIMAGE_OPERATOR_MAX_CONCURRENT_BUILDS", "0")
    with pytest.raises(ValueError, match="max_concurrent_builds"):
        OperatorSettings()  # type: ignore[call-arg]


def test_backoffs_double_and_stop_at_the_cap(environment: pytest.MonkeyPatch) -> None:
    config = OperatorSettings(retry_delay=10, retry_max_delay=60, storage_retry_delay=5)
    assert [config.retry_backoff(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 60]
    assert [config.storage_backoff(n) for n in (0, 1, 2, 5)] == [5, 10, 20, 60]
    # Jittered by a seed (the build key): 80-100 % of the delay, fixed per seed and attempt.
    jittered = [config.retry_backoff(2, f"key-{n}") for n in range(50)]
    assert all(16 <= delay <= 20 for delay in jittered) and len(set(jittered)) > 40
    assert config.retry_backoff(2, "key-1") == config.retry_backoff(2, "key-1")
    assert 48 <= config.storage_backoff(5, "key") <= 60


KEY = "cache.example.org-1:" + "B" * 43 + "="


def test_binary_caches_come_from_the_environment(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("NIXIMAGE_OPERATOR_SUBSTITUTERS", "https://a.example, file:///srv/cache")
    environment.setenv("NIXIMAGE_OPERATOR_TRUSTED_PUBLIC_KEYS", KEY)
    environment.setenv("NIXIMAGE_OPERATOR_NETRC_SECRET", "cache-netrc")
    config = OperatorSettings()  # type: ignore[call-arg]
    assert config.substituters == ["https://a.example", "file:///srv/cache"]
    assert config.trusted_public_keys == [KEY] and config.netrc_secret == "cache-netrc"


@pytest.mark.parametrize(
    ("substituters", "keys", "message"),
    [
        ("ftp://cache", KEY, "is not an http(s):// or file:// URL"),
        ("https://user:pw@cache", KEY, "is not an http(s):// or file:// URL"),
        ("https://cache", "", "substituters need trusted_public_keys"),
        ("https://cache", "cache:short", "is not 'name:base64 of 32 bytes'"),
    ],
)
def test_bad_binary_cache_settings_are_refused(
    environment: pytest.MonkeyPatch, substituters: str, keys: str, message: str
) -> None:
    environment.setenv("NIXIMAGE_OPERATOR_SUBSTITUTERS", substituters)
    environment.setenv("NIXIMAGE_OPERATOR_TRUSTED_PUBLIC_KEYS", keys)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OperatorSettings()  # type: ignore[call-arg]
