"""Config parsing: units, defaults, and one test per class of validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.cli import main
from router.config import Config, ConfigError, Target, demo_config_text
from router.units import parse_duration, parse_size

MINIMAL = {
    "providers": {"p": {"base_url": "https://api.example/v1", "api_key_env": "P_KEY"}},
    "routes": [{"match": "gpt-4o*", "targets": ["p/gpt-4o"]}],
}


def problems(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(raw)
    return info.value.problems


def with_provider(**fields: object) -> dict[str, object]:
    return {
        "providers": {"p": {"base_url": "https://api.example/v1", **fields}},
        "routes": [{"match": "m", "targets": ["p/m"]}],
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("48h", 172800),
        ("1d", 86400),
        (2, 2.0),
        ("1.5s", 1.5),
        ("10", 10.0),  # a bare number of seconds, as text too (an x-cascade-deadline header)
        ("1h30m", 5400),  # combined, as the Retry-After parser and Go durations write them
        ("1m30s", 90),
        ("2h 15m", 8100),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["fast", "-1s", "-10", "s", True, -3, None, "1 hour", "1h-30m", float("inf")]
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"), [("10MiB", 10 * 1024**2), ("512KB", 512000), ("100B", 100), (7, 7)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_minimal_config_gets_documented_defaults() -> None:
    config = Config.from_mapping(MINIMAL)
    p = config.providers["p"]
    assert (p.timeouts.connect, p.timeouts.first_byte, p.timeouts.idle, p.timeouts.total) == (
        5,
        30,
        30,
        300,
    )
    assert (p.max_retries, p.max_in_flight, p.dialect) == (2, 256, "openai")
    assert (config.server.host, config.server.port, config.server.deadline) == (
        "127.0.0.1",
        8080,
        120,
    )
    assert config.server.max_body == 10 * 1024 * 1024
    assert (config.retry.max_attempts, config.retry.strategy) == (4, "different_provider")
    assert (config.retry.backoff.base, config.retry.backoff.max, config.retry.backoff.jitter) == (
        0.1,
        5.0,
        "full",
    )
    assert p.rate_limit.max_retry_after == 48 * 3600


def test_the_issue_example_parses() -> None:
    text = """
server: {host: 127.0.0.1, port: 8080, deadline: 120s, max_body: 10MiB}
providers:
  openai-main:
    dialect: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    timeouts: {connect: 5s, first_byte: 30s, idle: 30s, total: 300s}
    max_retries: 2
    max_in_flight: 256
  openai-backup: {base_url: https://backup.example/v1}
  other: {base_url: https://other.example/v1}
routes:
  - match: "gpt-4o*"
    targets: [openai-main/gpt-4o, openai-backup/gpt-4o]
    alternatives: [other/gpt-4o-mini]
retry:
  max_attempts: 4
  backoff: {base: 100ms, max: 5s, jitter: full}
"""
    config = Config.from_yaml(text)
    route = config.routes[0]
    assert route.targets == (Target("openai-main", "gpt-4o"), Target("openai-backup", "gpt-4o"))
    assert route.alternatives == (Target("other", "gpt-4o-mini"),)


def test_routes_resolve_first_match_then_direct_provider_address() -> None:
    config = Config.from_mapping(
        {
            "providers": {"p": {"base_url": "http://p/v1"}, "q": {"base_url": "http://q/v1"}},
            "routes": [
                {"match": "exact", "targets": ["p/one"]},
                {"match": "gpt-*", "targets": ["q/two"]},
            ],
        }
    )
    assert config.resolve("exact")[1].targets == (Target("p", "one"),)  # type: ignore[index]
    assert config.resolve("gpt-4o")[1].targets == (Target("q", "two"),)  # type: ignore[index]
    direct = config.resolve("p/some/model")
    assert direct is not None and direct[1].targets == (Target("p", "some/model"),)
    assert direct[0] == "p/*"  # the metric label: from the config, never the client's model
    assert config.resolve("nope") is None
    assert config.resolve("unknown/x") is None
    assert config.model_names() == ["exact"]


def test_error_names_field_path_and_bad_value() -> None:
    assert problems(with_provider(timeouts={"first_byte": "fast"})) == [
        "providers.p.timeouts.first_byte: expected a positive duration like \"30s\", got 'fast'"
    ]


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "server": {"port": 99999, "max_body": "lots"},
        "providers": {"p": {"base_url": "ftp://x", "max_retries": -1, "colour": "blue"}},
        "routes": [{"match": "m", "targets": ["nobody/m", "no-slash"]}],
        "retry": {"strategy": "random", "backoff": {"jitter": "some"}},
    }
    found = problems(raw)
    assert found == [
        "server.port: expected an integer >= 0 and <= 65535, got 99999",
        "server.max_body: expected a size like \"10MiB\", got 'lots'",
        "providers.p.base_url: expected an http:// or https:// URL, got 'ftp://x'",
        "providers.p.max_retries: expected an integer >= 0 and <= 100, got -1",
        "providers.p.colour: unknown field",
        "routes[0].targets[0]: unknown provider 'nobody'",
        "routes[0].targets[1]: expected \"provider/model\", got 'no-slash'",
        "retry.strategy: expected one of same_model, same_provider, different_provider, got 'random'",
        "retry.backoff.jitter: expected one of full, equal, decorrelated, none, got 'some'",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "<root>: expected a mapping, got nothing"),
        ({"routes": []}, "providers: at least one provider is required"),
        ({**MINIMAL, "extra": 1}, "extra: unknown field"),
        (
            with_provider(api_key="sk-secret"),
            "providers.p.api_key: API keys are never written in the config; use api_key_env",
        ),
        (
            with_provider(limits={"rpm": 0}),
            "providers.p.limits.rpm: expected an integer >= 1, got 0",
        ),
        (
            with_provider(max_in_flight=True),
            "providers.p.max_in_flight: expected an integer >= 1, got True",
        ),
        (with_provider(latency={"measure": "ttfb"}), "providers.p.latency.threshold: is required"),
        (
            with_provider(latency={"threshold": "1s", "measure": "p99"}),
            "providers.p.latency.measure: expected one of ttfb, total, got 'p99'",
        ),
        (
            with_provider(rate_limit={"block_base": "10m", "block_max": "1m"}),
            "providers.p.rate_limit.block_max: must be at least block_base",
        ),
        (
            with_provider(headers={"x": 1}),
            "providers.p.headers: expected a mapping of header names to strings",
        ),
        (
            with_provider(headers={"x-org": "a\r\nx-evil: 1"}),
            "providers.p.headers.x-org: the value may not contain CR, LF or NUL",
        ),
        (
            with_provider(headers={"x-org": "caf\u00e9 \u65e5"}),
            "providers.p.headers.x-org: must be Latin-1 text",
        ),
        (
            with_provider(headers={"x org": "a"}),
            "providers.p.headers.x org: not a valid HTTP header name",
        ),
        (
            with_provider(mock={"latency": "1s"}),
            "providers.p.base_url: a provider has either base_url or mock, not both",
        ),
        (
            with_provider(mock={"rate_429": 2}),
            "providers.p.mock.rate_429: expected a number from 0 to 1, got 2",
        ),
        (with_provider(timeouts=[1]), "providers.p.timeouts: expected a mapping, got a list"),
        ({**MINIMAL, "routes": [{"match": "m"}]}, "routes[0].targets: needs at least one target"),
        ({**MINIMAL, "routes": [{"targets": ["p/m"]}]}, "routes[0].match: is required"),
        ({**MINIMAL, "routes": {"m": 1}}, "routes: expected a list, got a mapping"),
        (
            {**MINIMAL, "retry": {"on_status": [{"codes": ["500-4"]}]}},
            "retry.on_status[0].codes[0]: expected a status code or range like \"500-504\", got '500-4'",
        ),
        (
            {**MINIMAL, "retry": {"on_status": [{"strategy": "return"}]}},
            "retry.on_status[0].codes: is required",
        ),
        (
            {**MINIMAL, "retry": {"max_attempts": 0}},
            "retry.max_attempts: expected an integer >= 1 and <= 100, got 0",
        ),
        (
            {**MINIMAL, "routes": [{"match": "m", "targets": ["p/m"], "hedge": {"after": "soon"}}]},
            "routes[0].hedge.after: expected a positive duration like \"30s\", got 'soon'",
        ),
    ],
)
def test_validation_errors(raw: object, expected: str) -> None:
    assert expected in problems(raw)


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_yaml("providers: {p: [unclosed\n", source="bad.yaml")
    assert info.value.problems[0].startswith("bad.yaml:")


def test_status_rules_accept_codes_ranges_and_lists() -> None:
    config = Config.from_mapping(
        {
            **MINIMAL,
            "retry": {
                "on_status": [{"codes": [429, "500-502", "404,408"], "strategy": "same_model"}]
            },
        }
    )
    assert config.retry.on_status[0].codes == {429, 500, 501, 502, 404, 408}


def test_secret_is_read_from_environment_not_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P_KEY", "sk-test-123")
    config = Config.from_mapping(MINIMAL)
    assert config.providers["p"].api_key() == "sk-test-123"
    assert "sk-test-123" not in repr(config)


def test_demo_config_is_valid() -> None:
    config = Config.from_yaml(demo_config_text())
    assert set(config.mocks) == set(config.providers)


@pytest.mark.parametrize(
    "key", ["sk-proj-abcdefghijklmnop1234", "sk-ant-api03-AbCdEf012345", "0123456789abcdef" * 3]
)
def test_a_key_pasted_into_the_wrong_field_is_never_echoed(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = with_provider(base_url=key, timeouts={"first_byte": key}, max_retries=key)
    raw["routes"] = [{"match": "m", "targets": [key]}]
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert key not in out
    assert "providers.p.base_url: expected an http:// or https:// URL, got <a value" in out
    assert out.count("looks like a key; not shown") == 4


def test_ordinary_values_are_still_shown() -> None:
    assert problems(with_provider(base_url="ftp://host/v1")) == [
        "providers.p.base_url: expected an http:// or https:// URL, got 'ftp://host/v1'"
    ]


def test_a_provider_with_headers_keeps_its_name() -> None:
    """The header loop once reused `name`: the provider took its last header's name."""
    config = Config.from_mapping(with_provider(headers={"x-team": "a", "x-other": "b"}))
    assert list(config.providers) == ["p"] and config.providers["p"].name == "p"


def test_a_provider_needs_base_url_or_mock() -> None:
    raw = {"providers": {"p": {"api_key_env": "K"}}, "routes": [{"match": "m", "targets": ["p/m"]}]}
    assert problems(raw) == [
        "providers.p.base_url: is required (or mock: for a local mock provider)"
    ]


def test_duplicate_yaml_keys_are_an_error() -> None:
    text = "providers:\n  p:\n    base_url: http://a/v1\n    base_url: http://b/v1\nroutes: []\n"
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(text, source="c.yaml")
    assert info.value.problems == ["c.yaml:4:5: not valid YAML (duplicate key 'base_url')"]


def test_a_config_that_is_not_utf8_is_a_problem_with_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Latin-1 bytes in a comment once raised UnicodeDecodeError out of `cascade check` (and out
    of every reload): now it is one problem, naming the line, the column and the byte."""
    path = tmp_path / "cascade.yaml"
    path.write_bytes(b"# ok\n# r\xe9sum\xe9\nroutes: []\n")
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out == (f"{path}:2:4: not UTF-8 (byte 0xe9); save it as UTF-8\n")


def test_an_azure_provider_names_what_is_wrong() -> None:
    found = problems(with_provider(azure={"deployments": {"gpt-4o": 3}, "auth": "token"}))
    assert any("azure.api_version: is required" in p for p in found)
    assert any("azure.deployments.gpt-4o: expected the deployment's name" in p for p in found)
    assert any("azure.auth:" in p for p in found)
    assert any("azure: is for an OpenAI-dialect provider" in p for p in problems(
        with_provider(dialect="anthropic", azure={"api_version": "2024-10-21"})))  # fmt: skip


def test_an_azure_provider_maps_models_to_deployments() -> None:
    config = Config.from_mapping(
        with_provider(azure={"api_version": "2024-10-21", "deployments": {"gpt-4o": "prod"}})
    )
    provider = config.providers["p"]
    assert provider.path_for("/chat/completions", "gpt-4o") == (
        "/openai/deployments/prod/chat/completions?api-version=2024-10-21"
    )
    assert provider.path_for("/chat/completions", "o3").startswith("/openai/deployments/o3/")
