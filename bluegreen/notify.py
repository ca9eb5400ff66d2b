"""Deploy notifications: a Slack-compatible JSON POST that can never fail or stall a deploy."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from bluegreen.journal import RESULT_DEPLOYED, Entry

_ICONS = {RESULT_DEPLOYED: ":white_check_mark:", "failed": ":x:", "refused": ":no_entry:", "attention": ":rotating_light:"}
# No proxy handling surprises and no redirects: a webhook either answers or it does not.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def send(url: str, body: dict, *, timeout: float = 3.0) -> str | None:
    """POST `body`; returns None, or why it failed, in words that never contain the URL."""
    data = json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            resp.read(4096)
        return None
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"the webhook answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.timeout):
            return f"no answer within {timeout:g}s"
        return f"could not reach the webhook ({type(reason).__name__ if not isinstance(reason, str) else 'error'}: {_strip(reason)})"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g}s"
    except Exception as exc:  # a broken endpoint (bad status line, cut body...) must not break a deploy
        return f"could not send ({type(exc).__name__})"


def _strip(reason: object) -> str:
    # OSError strings can carry a host name but never the path or query that hold the secret.
    text = str(getattr(reason, "strerror", None) or reason)
    return text.split("://")[0] if "://" in text else text
