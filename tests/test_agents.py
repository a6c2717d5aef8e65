"""The real coding-agent CLIs through Cascade, non-interactively, against local providers only:
Claude Code (`/v1/messages`, its default tools and thinking) and the Codex CLI
(`/v1/responses`), each using a tool and sending its result back, exit 0 and the answer printed,
through a route whose primary fails (rate limited, or killed mid-stream) and whose alternative
speaks the other dialect (issues 19 and 20).

Both are installed by .ci/system-deps (npm, pinned in tests/agents/package-lock.json). Where they
could not be installed (no npm registry), these tests are skipped, with that reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.live import Exchange, FakeUpstream, anthropic_events, chunk_event, live_gateway

BIN = Path(__file__).parent / "agents" / "node_modules" / ".bin"
CLAUDE = BIN / "claude"
CODEX = BIN / "codex"

pytestmark = pytest.mark.agents
needs_claude = pytest.mark.skipif(
    not CLAUDE.exists(),
    reason="Claude Code is not installed: .ci/system-deps installs it (needs npm and the npm"
    " registry)",
)
needs_codex = pytest.mark.skipif(
    not CODEX.exists(),
    reason="the Codex CLI is not installed: .ci/system-deps installs it (needs npm and the npm"
    " registry)",
)

PROMPT = "Use the Read tool to read notes.txt"


async def run_claude(url: str, workdir: Path, model: str = "claude-demo") -> tuple[int, str, str]:
    """`claude -p` against the gateway at `url`, with no network but 127.0.0.1: telemetry,
    updates and other non-essential traffic off, a HOME of its own."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-ant-not-a-real-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    return await run_agent([str(CLAUDE), "-p", PROMPT, "--model", model], workdir, env)


async def run_agent(argv: list[str], workdir: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """An agent CLI in a project holding notes.txt, bounded in time: (exit code, out, err)."""
    project = workdir / "project"
    project.mkdir(exist_ok=True)
    (project / "notes.txt").write_text("the meeting is at ten\n")
    with trio.fail_after(90):
        done = await trio.run_process(
            argv, cwd=project, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def seen_by(up: FakeUpstream) -> list[dict[str, Any]]:
    return [json.loads(e.body) for e in up.exchanges]


async def rate_limited(exchange: Exchange) -> None:
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    await exchange.json_answer(429, error, **{"retry-after": "60"})


def gateway(primary: FakeUpstream) -> Any:
    """Every model to an Anthropic-dialect primary, then an OpenAI-dialect mock."""
    return live_gateway(
        {"claude": primary},
        providers={"claude": {"dialect": "anthropic"}},
        extra_providers={"gpt": {"mock": {}}},
        routes=[{"match": "*", "targets": ["claude/claude-x", "gpt/gpt-x"]}],
    )


@needs_claude
async def test_claude_code_fails_over_to_an_openai_provider_and_uses_a_tool(
    tmp_path: Path,
) -> None:
    primary = FakeUpstream(rate_limited)
    async with gateway(primary) as gw:
        code, out, err = await run_claude(gw.url, tmp_path)
    assert code == 0, err
    # The OpenAI-dialect mock answered: first a call to the Read tool, which Claude Code ran
    # and sent back; then text quoting the tool's result.
    assert out.startswith("[gpt] the tool said:"), out
    first = seen_by(primary)[0]  # what Claude Code sent, as the primary saw it (then a 429)
    assert first["thinking"]["type"] in ("adaptive", "enabled")
    assert any(m["role"] == "system" for m in first["messages"])  # mid-conversation system
    assert len(first["tools"]) >= 10 and "context_management" in first


@needs_claude
async def test_claude_code_is_rescued_when_its_primary_dies_mid_stream(tmp_path: Path) -> None:
    """The primary starts an answer and dies (its connection dropped after the first events),
    then refuses every call (503, as a dead backend behind a balancer): the agent sees a clean
    error, retries, and the alternative serves it. No hang, exit 0."""
    calls = 0

    async def dies(exchange: Exchange) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            error = {"type": "error", "error": {"type": "api_error", "message": "gone"}}
            await exchange.json_answer(503, error)
            return
        await exchange.start(200, "text/event-stream")
        events = anthropic_events(["the ", "answer ", "is"], "claude-x")
        for event in events[:4]:  # message_start, a block's start, a delta or two
            await exchange.body_part(event)
        raise RuntimeError("the primary died")  # the server drops the connection mid-body

    primary = FakeUpstream(dies)
    async with gateway(primary) as gw:
        code, out, err = await run_claude(gw.url, tmp_path)
    assert code == 0, err
    assert out.startswith("[gpt] the tool said:"), out
    assert calls >= 2  # the stream that died, then the refusals that sent it to the mock


async def run_codex(url: str, workdir: Path) -> tuple[int, str, str]:
    """`codex exec` against the gateway's /v1/responses, with a CODEX_HOME of its own."""
    home = workdir / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "gpt-demo"\nmodel_provider = "cascade"\n\n[model_providers.cascade]\n'
        f'name = "Cascade"\nbase_url = "{url}/v1"\nwire_api = "responses"\n'
        'env_key = "CASCADE_API_KEY"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "CASCADE_API_KEY": "not-a-real-key",
    }
    argv = [str(CODEX), "exec", "--skip-git-repo-check", "Use exec_command to read notes.txt"]
    return await run_agent(argv, workdir, env)


def codex_gateway(primary: FakeUpstream) -> Any:
    """Every model to an OpenAI-dialect primary, then an Anthropic-dialect mock; both drop what
    they cannot take (Codex always offers web_search, a server tool)."""
    return live_gateway(
        {"gpt": primary},
        providers={"gpt": {"drop_params": True}},
        extra_providers={"claude": {"mock": {}, "dialect": "anthropic", "drop_params": True}},
        routes=[{"match": "*", "targets": ["gpt/gpt-x", "claude/claude-x"]}],
    )


async def openai_limited(exchange: Exchange) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
    await exchange.json_answer(429, error, **{"retry-after": "60"})


@needs_codex
async def test_codex_fails_over_to_an_anthropic_provider_and_runs_a_tool(tmp_path: Path) -> None:
    primary = FakeUpstream(openai_limited)
    async with codex_gateway(primary) as gw:
        code, out, err = await run_codex(gw.url, tmp_path)
    assert code == 0, err
    # The Anthropic-dialect mock called exec_command (Codex ran it and sent its output back),
    # then answered quoting that output: the second turn, served.
    assert "[claude] the tool said:" in out, out + err
    first = seen_by(primary)[0]  # what the primary was sent, translated from Codex's request
    assert first["stream"] is True and any(t["function"]["name"] == "exec_command"
                                           for t in first["tools"])  # fmt: skip


@needs_codex
async def test_codex_is_rescued_when_its_primary_dies_mid_stream(tmp_path: Path) -> None:
    calls = 0

    async def dies(exchange: Exchange) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await exchange.json_answer(503, {"error": {"message": "gone", "type": "server_error"}})
            return
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(chunk_event("half an "))
        raise RuntimeError("the primary died")

    primary = FakeUpstream(dies)
    async with codex_gateway(primary) as gw:
        code, out, err = await run_codex(gw.url, tmp_path)
    assert code == 0, err
    assert "[claude] the tool said:" in out, out + err
    assert calls >= 2


@needs_claude
async def test_claude_code_never_sees_a_stream_cut_on_a_route_that_resumes(
    tmp_path: Path,
) -> None:
    """The primary starts the answer and dies mid-text; the route resumes: the OpenAI-dialect
    mock continues it from the text Claude Code already has, and Claude Code prints the one
    answer, never having seen an error (one call to the primary, no retry)."""

    async def dies(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        events = anthropic_events(["the ", "answer ", "is "], "claude-x")
        await exchange.body_part(b"".join(events[:5]))  # start, block, ping, two words
        raise RuntimeError("the primary died")  # the server drops the connection mid-body

    primary = FakeUpstream(dies)
    async with live_gateway(
        {"claude": primary},
        providers={"claude": {"dialect": "anthropic"}},
        extra_providers={"gpt": {"mock": {}, "prefill": "trailing"}},
        routes=[{"match": "*", "targets": ["claude/claude-x", "gpt/gpt-x"], "resume": True}],
    ) as gw:
        code, out, err = await run_claude(gw.url, tmp_path)
    assert code == 0, err
    assert out.startswith("the answer word0 word1"), out  # its words, then the mock's
    assert len(primary.exchanges) == 1
