"""`cascade status`: the operator's live view in the terminal, from `/admin/status`; and
`cascade usage`: what client keys spent, from `/admin/usage`.

Every provider actor (blocks with reason and time left, circuits, in-flight against its limit,
requests and tokens in the last minute, first-byte p50/p95), every route with its targets in
order and the one serving now, and the recent cascades: what was tried, skipped, and who served.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import httpx


def render(status: dict[str, Any], recent: list[dict[str, Any]]) -> str:
    lines = ["providers"]
    for p in status["providers"]:
        blocks = [f"{b['key']} {b['reason']} {b['seconds_left']:.0f}s" for b in p["blocks"]]
        circuits = [f"{c['key']} circuit {c['state']}" for c in p["circuits"]]
        ttfb = p["ttfb_p50_ms"], p["ttfb_p95_ms"]
        latency = (
            f"ttfb p50 {ttfb[0]:.0f} p95 {ttfb[1]:.0f} ms" if ttfb[0] is not None else "ttfb -"
        )
        lines.append(
            f"  {p['name']:<18} {p.get('dialect', ''):<9} in flight {p['in_flight']}/"
            f"{p['max_in_flight']:<5} rpm {p['requests_last_minute']:<5} tpm "
            f"{p['tokens_last_minute']:<7} {latency}"
            + ("   " + ", ".join(blocks + circuits) if blocks or circuits else "   ok")
        )
    lines.append("routes")
    for r in status["routes"]:
        order = " > ".join(r["targets"])
        if r["alternatives"]:
            order += " | then " + " > ".join(r["alternatives"])
        lines.append(f"  {r['match']:<18} {order}   serving: {r['serving'] or '-'}")
    lines.append("recent cascades")
    lines += [_cascade_line(e) for e in recent[-15:]]
    return "\n".join(lines)


def _cascade_line(e: dict[str, Any]) -> str:
    """One recent cascade: who served it, what it went around, a stream resumed."""
    tried = ", ".join(f"{a['provider']}/{a['model']} {a['error_type']}" for a in e["attempts"])
    served = e["served_by"] or "nobody"
    resumed = ", ".join(f"{r['from']} -> {r['to'] or 'nobody'} {r['outcome']}"
                        for r in e.get("resumes", ()))  # fmt: skip
    return (
        f"  {e['request_id'][:8]} {e['route']:<14} {e['status']} {e['ms']:>7.0f} ms"
        f"  served by {served}"
        + (f"  (went around: {tried})" if tried else "")
        + (f"  (stream resumed: {resumed})" if resumed else "")
    )


def admin_headers(command: str, token_env: str | None) -> dict[str, str] | None:
    """The admin token's header from `token_env` (none without one); None, having said why,
    when the variable is not set."""
    if not token_env:
        return {}
    token = os.environ.get(token_env)
    if not token:
        print(
            f"cascade {command}: the environment variable {token_env} is not set", file=sys.stderr
        )
        return None
    return {"authorization": f"Bearer {token}"}


def run(url: str, token_env: str | None, once: bool, interval: float) -> int:
    headers = admin_headers("status", token_env)
    if headers is None:
        return 1
    recent: list[dict[str, Any]] = []
    after = 0
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10) as client:
        while True:
            try:
                r = client.get("/admin/status", params={"after": after})
            except httpx.HTTPError as exc:
                print(f"cascade status: {url}: {exc}", file=sys.stderr)
                return 1
            if r.status_code != 200:
                print(f"cascade status: {url} answered {r.status_code}", file=sys.stderr)
                return 1
            status = r.json()
            recent = (recent + status["recent"])[-100:]
            after = recent[-1]["seq"] if recent else after
            text = render(status, recent)
            if once:
                print(text)
                return 0
            print("\x1b[2J\x1b[H" + text, flush=True)  # clear the screen, then draw
            time.sleep(interval)


def render_usage(rows: list[dict[str, Any]], group: str) -> str:
    """Spend per `group` (key, route, provider or model) from /admin/usage rows."""
    totals: dict[str, list[float]] = {}
    for row in rows:
        t = totals.setdefault(str(row[group]), [0, 0, 0, 0.0])
        t[0] += row["requests"]
        t[1] += row["input"]
        t[2] += row["output"]
        t[3] += row["cost"]
    lines = [f"{group:<24} {'requests':>9} {'input':>12} {'output':>12} {'cost USD':>12}"]
    for name, (requests, inputs, outputs, cost) in sorted(totals.items()):
        lines.append(
            f"{name:<24} {requests:>9.0f} {inputs:>12.0f} {outputs:>12.0f} {_usd(cost):>12}"
        )
    if not totals:
        lines.append("(nothing settled in this period)")
    return "\n".join(lines)


def usage(
    url: str, token_env: str | None, since: float, by: str, as_json: bool, replica: bool = False
) -> int:
    """`cascade usage`: spend over the last `since` seconds, from GET /admin/usage: the
    deployment's with Redis (whole hours), this replica's with `replica` or without Redis."""
    headers = admin_headers("usage", token_env)
    if headers is None:
        return 1
    now = time.time()
    try:
        r = httpx.get(
            url.rstrip("/") + "/admin/usage",
            params={
                "since": now - since,
                "until": now,
                "scope": "replica" if replica else "deployment",
            },
            headers=headers,
            timeout=30,
        )
    except httpx.HTTPError as exc:
        print(f"cascade usage: {url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"cascade usage: {url} answered {r.status_code}: {r.text[:300]}", file=sys.stderr)
        return 1
    body = r.json()
    rows = body["usage"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if body.get("scope") == "deployment":
        start, end = (
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(body[k])) for k in ("since", "until")
        )
        print(f"every replica, {start} to {end} UTC (whole hours)")
    else:
        print("this replica")
    print(render_usage(rows, by))
    return 0


def _usd(cost: float) -> str:
    """A cost with the precision it has: cents when it is dollars, six decimals (micro-dollars,
    a token's price) below a cent, 0 when nothing was spent."""
    if cost == 0:
        return "0"
    return f"{cost:.2f}" if cost >= 0.01 else f"{cost:.6f}"
