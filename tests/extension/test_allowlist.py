"""The example extension (examples/template-allowlist) through the official `e2b` SDK: a team
whose allow-list does not name a template cannot create a sandbox from it, and the SDK's
error says why; the list is edited over the extension's own route."""

import json
import urllib.error
import urllib.request

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException


def call(server, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method=method,
        headers={"X-API-KEY": server.key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
            return answer.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def create(server, template):
    return Sandbox.create(template, api_key=server.key, api_url=server.url, timeout=60)


def test_a_template_off_the_teams_list_is_refused_through_the_sdk_with_the_reason(server):
    status, body = call(server, "PUT", "/ext/allowlist/templates", {"templates": ["base"]})
    assert status == 200, body
    assert body == {"enforced": True, "templates": ["base"]}

    with pytest.raises(SandboxException) as refused:
        create(server, "python")
    message = str(refused.value)
    assert "403" in message, message
    assert 'template "python" is not on this team\'s template allow-list (allowed: base)' in message

    # On the list, the create goes past the extension: this control plane has no host, so
    # it is the template that is not found, not a refusal.
    with pytest.raises(Exception) as not_found:
        create(server, "base")
    assert "allow-list" not in str(not_found.value), not_found.value
    assert "not found" in str(not_found.value), not_found.value

    # Both attempts and the list's change are in the audit log, with their outcomes.
    status, body = call(server, "GET", "/v1/audit?limit=100")
    assert status == 200, body
    seen = [(row["action"], row["outcome"]) for row in body["entries"]]
    assert ("PUT /ext/allowlist/templates", 200) in seen, seen
    assert ("POST /v2/sandboxes", 403) in seen, seen
    assert ("POST /v2/sandboxes", 404) in seen, seen

    # Without a list, nothing is refused by the extension.
    status, _ = call(server, "DELETE", "/ext/allowlist/templates")
    assert status == 204
    with pytest.raises(Exception) as after:
        create(server, "python")
    assert "allow-list" not in str(after.value), after.value
