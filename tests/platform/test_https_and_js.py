"""What a user of `wrenn up` meets with only a domain: E2B_DOMAIN=wrenn.localhost (plus the
local authority's certificates), no E2B_API_URL or E2B_SANDBOX_URL. The SDK then builds
https://api.<domain> and https://<port>-<id>.<domain> itself, as against E2B; get_host(),
download_url() and upload_url() must work from this machine. And the official JS SDK (npm
`e2b`, pinned in tests/js) against the same `wrenn up`, both ways."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def domain_only_env(wrenn) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_DOMAIN=wrenn.domain,
        E2B_API_KEY=wrenn.key,
        SSL_CERT_FILE=wrenn.ca_bundle,
        NODE_EXTRA_CA_CERTS=wrenn.ca_cert,
    )
    return env


USER_SCRIPT = textwrap.dedent(
    """
    import json, ssl, sys, time, urllib.request
    from e2b import Sandbox

    def fetch(url, data=None, method=None, headers=None):
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()

    sandbox = Sandbox.create(timeout=120)
    report = {"api_url": sandbox.connection_config.api_url}
    try:
        report["envd_url"] = sandbox.envd_api_url
        report["run"] = sandbox.commands.run("echo hi from $(whoami)").stdout
        sandbox.commands.run("mkdir -p /tmp/site && echo served > /tmp/site/index.html")
        sandbox.commands.run("python3 -m http.server 8000 --directory /tmp/site", background=True)
        host = sandbox.get_host(8000)
        report["host"] = host
        for _ in range(100):
            try:
                report["port"] = fetch(f"https://{host}/index.html")[1].decode()
                break
            except Exception as error:
                report["port_error"] = repr(error)
                time.sleep(0.3)
        sandbox.files.write("/home/user/signed.txt", "through a signed URL")
        status, body = fetch(sandbox.download_url("/home/user/signed.txt"))
        report["download"] = [status, body.decode()]
        upload = sandbox.upload_url("/home/user/uploaded.txt")
        # As a browser form (or `curl -F file=@…`) sends it.
        boundary = "wrenn-test-boundary"
        form = (
            f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"uploaded.txt\\"\\r\\n"
            "Content-Type: text/plain\\r\\n\\r\\nuploaded by URL\\r\\n"
            f"--{boundary}--\\r\\n"
        ).encode()
        status, _ = fetch(upload, data=form, method="POST",
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        report["upload_status"] = status
        report["uploaded"] = sandbox.files.read("/home/user/uploaded.txt")
    finally:
        sandbox.kill()
    print(json.dumps(report))
    """
)


def test_the_sdk_with_only_a_domain_reaches_api_ports_and_signed_urls_over_https(wrenn, tmp_path):
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], env=domain_only_env(wrenn), capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["api_url"] == f"https://api.{wrenn.domain}"
    assert report["run"] == "hi from user\n"
    assert report["host"].startswith("8000-") and report["host"].endswith(f".{wrenn.domain}")
    assert report.get("port") == "served\n", report
    assert report["download"] == [200, "through a signed URL"]
    assert report["upload_status"] in (200, 204)
    assert report["uploaded"] == "uploaded by URL"


def test_https_refuses_a_client_that_does_not_trust_the_local_authority(wrenn):
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(urllib.error.URLError) as error:
        urllib.request.urlopen(f"https://api.{wrenn.domain}/health", context=context, timeout=10)
    assert isinstance(error.value.reason, ssl.SSLCertVerificationError)
    trusted = ssl.create_default_context(cafile=wrenn.ca_bundle)
    with urllib.request.urlopen(f"https://api.{wrenn.domain}/health", context=trusted, timeout=10) as ok:
        assert ok.status == 204


def node_dir() -> str:
    found = os.environ.get("WRENN_NODE_DIR")
    if not found:
        pytest.fail("WRENN_NODE_DIR is not set: scripts/test.sh installs Node.js and the JS SDK", pytrace=False)
    return found


@pytest.mark.parametrize("how", ["urls", "domain"])
def test_the_js_sdk(wrenn, how):
    tests_js = os.path.join(os.path.dirname(__file__), "..", "js")
    if how == "domain":
        env = domain_only_env(wrenn)
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        env.update(E2B_API_URL=wrenn.api_url, E2B_SANDBOX_URL=wrenn.proxy_url, E2B_API_KEY=wrenn.key)
    env["PATH"] = os.path.join(node_dir(), "bin") + os.pathsep + env.get("PATH", "")
    done = subprocess.run(
        [os.path.join(node_dir(), "bin", "node"), "--test", "--test-concurrency=1", "sdk.test.mjs"],
        cwd=tests_js, env=env, capture_output=True, timeout=600,
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output[-6000:]
    assert "# fail 0" in output, output[-6000:]
