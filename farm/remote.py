"""A farm read through its gateway, for an operator whose machine has no registry or broker
URL: `farm status --gateway URL` with an admin key asks the gateway's /farm/status
(farm/gateway/operator.py) for the JSON that `farm status --json` prints.

Plain urllib: the CLI stays quick to start, and an operator's laptop needs nothing more.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from farm.errors import ConfigError, FarmError, FarmUnavailable, UnknownJob

TIMEOUT_S = 30.0


def gateway_status(url: str, key: str | None, job_id: str | None = None) -> dict[str, Any]:
    """The farm's status (or one job's) from the gateway at `url`, asked with `key`."""
    path = "/farm/status" + ("" if job_id is None else "/" + quote(job_id, safe=""))
    request = urllib.request.Request(url.rstrip("/") + path, headers={"Accept": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise _refusal(url, e) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FarmUnavailable(
            f"cannot reach the gateway at {url}: {reason}; check the URL (--gateway or "
            "FARM_GATEWAY_URL) and that `farm serve` runs there"
        ) from None
    except ValueError:
        raise FarmUnavailable(
            f"the gateway at {url} did not answer with JSON: is it farm's?"
        ) from None
    if not isinstance(answer, dict):
        raise FarmUnavailable(f"the gateway at {url} did not answer with a JSON object")
    return answer


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is refused, not followed: urllib would send the admin key to wherever it
    points, another host or plain http included."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        raise urllib.error.HTTPError(
            req.full_url, code, f"redirected to {newurl}; give that URL as --gateway", headers, fp
        )


_OPENER = urllib.request.build_opener(_NoRedirects)


def _refusal(url: str, e: urllib.error.HTTPError) -> FarmError:
    try:
        message = str(json.loads(e.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        message = f"HTTP {e.code} {e.reason}"
    if 300 <= e.code < 400:
        return ConfigError(f"the gateway at {url} answered {e.code}: {e.reason}")
    if e.code == 404 and "no job" in message:
        return UnknownJob(message)
    if e.code == 404:
        return FarmUnavailable(
            f"the gateway at {url} has no /farm/status: is it farm's, and as new as this CLI?"
        )
    if e.code in (401, 403):
        return ConfigError(
            f"the gateway at {url} refused: {message} (the key comes from --key or FARM_API_KEY)"
        )
    return FarmUnavailable(f"the gateway at {url} answered {e.code}: {message}")
