"""Deploy notifications: a Slack-compatible JSON POST that can never fail or stall a deploy."""

from __future__ import annotations

import json

from bluegreen import http_client
from bluegreen.journal import RESULT_DEPLOYED, Entry

_ICONS = {RESULT_DEPLOYED: ":white_check_mark:", "failed": ":x:", "refused": ":no_entry:", "attention": ":rotating_light:"}
# No proxy (http_proxy/https_proxy are ignored, as for every request bluegreen makes) and no redirect:
# a webhook either answers or it does not. A host that reaches its webhook only through a proxy needs a
# relay it can reach directly.


def payload(entry: Entry) -> dict:
    """Slack's `text`, plus the same facts as fields for any other receiver."""
    what = "rolled back to" if entry.action == "rollback" else "deployed"
    if entry.result == RESULT_DEPLOYED:
        head = f"{entry.project} {what} {entry.tag} on {entry.host}"
    else:
        head = f"{entry.project} {entry.action} of {entry.tag} on {entry.host}: {entry.result.upper()}"
    moves = f"{entry.from_colour or '-'} ({entry.from_tag or '-'}) -> {entry.to_colour or '-'}"
    lines = [f"{_ICONS.get(entry.result, '')} {head}".strip(), f"{moves}, {entry.duration:.1f}s, by {entry.user}"]
    if entry.result != RESULT_DEPLOYED:
        lines.append(f"failed step: {entry.failed_step or '-'}; {entry.message.splitlines()[0] if entry.message else ''}")
    return {
        "text": "\n".join(lines),
        "bluegreen": {
            "project": entry.project,
            "action": entry.action,
            "tag": entry.tag,
            "host": entry.host,
            "user": entry.user,
            "result": entry.result,
            "exit_code": entry.exit_code,
            "from": entry.from_colour,
            "to": entry.to_colour,
            "from_tag": entry.from_tag,
            "duration": round(entry.duration, 3),
            "failed_step": entry.failed_step,
            "message": entry.message,
        },
    }


def send(url: str, body: dict, *, timeout: float = 3.0, context: object | None = None) -> str | None:
    """POST `body`, all of it (DNS, connect, TLS, answer) within `timeout`; returns None, or why it failed.

    The words never contain the URL or a Location header (both can hold the webhook's secret). `context`
    is an ssl.SSLContext (tests pass one trusting their own CA); by default the system's CAs and SNI.
    """
    data = json.dumps(body).encode("utf-8")
    try:
        resp = http_client.request("POST", url, timeout=timeout, body=data,
                                   headers={"Content-Type": "application/json"}, context=context)
    except http_client.HttpError as exc:
        if exc.kind == http_client.TIMEOUT:
            return exc.detail
        if exc.kind in (http_client.REFUSED, http_client.DNS, http_client.NETWORK, http_client.TLS):
            return f"could not reach the webhook ({exc.detail})"
        return f"could not send ({exc.detail})"
    except Exception as exc:  # noqa: BLE001 - a broken endpoint must never break a deploy
        return f"could not send ({type(exc).__name__})"
    if 300 <= resp.status < 400:
        # Following it would turn the POST into a GET without the body (what urllib did): not a delivery.
        return (f"the webhook answered with a redirect (HTTP {resp.status}), which bluegreen does not follow; "
                f"set NOTIFY_WEBHOOK_URL to the address it redirects to")
    if not 200 <= resp.status < 300:
        return f"the webhook answered HTTP {resp.status}"
    return None
