"""The real `e2b` SDK's `Template` builder against `wrenn up`: templates built from `base` step by
step, their sandboxes, a failing step, and what another team may see of them."""

import pytest
from e2b import Sandbox, Template, wait_for_port
from e2b.exceptions import BuildException, SandboxException


def test_a_template_built_from_base_runs_its_steps_and_start_command(wrenn, tmp_path):
    # COPY's sources: a folder with relative, absolute and dangling links, and a script.
    folder = tmp_path / "folder"
    (folder / "deeper").mkdir(parents=True)
    (folder / "a.txt").write_text("copied\n")
    (folder / "deeper" / "b.txt").write_text("deeper\n")
    (folder / "relative").symlink_to("a.txt")
    (folder / "absolute").symlink_to("/etc/hostname")
    (folder / "dangling").symlink_to("nowhere")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template("base")
        .run_cmd("echo built > /home/user/built.txt && echo to-the-log")
        .set_envs({"GREETING": "hello from the build"})
        .set_workdir("/home/user/app")
        .copy("folder", "/home/user/folder")
        .copy("tool.sh", "/usr/local/bin/", user="root", mode=0o755)
        .run_cmd('echo "$GREETING" > greeting.txt; id -un > who.txt')
        .run_cmd("id -un > /root-made.txt", user="root")
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )
    logs = []
    info = Template.build(template, "sdk-app:v1", cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    assert info.name == "sdk-app:v1"
    messages = [entry.message for entry in logs]
    assert "to-the-log" in messages, messages
    assert any("RUN id -un > /root-made.txt (as root)" in m for m in messages), messages
    assert Template.exists("sdk-app")
    assert not Template.exists("no-such-template")

    sandbox = Sandbox.create("sdk-app", timeout=120)
    try:
        run = sandbox.commands.run
        assert run("cat /home/user/built.txt").stdout == "built\n"
        # The build's last WORKDIR and USER are the sandbox's; its ENV was the build's only.
        assert run("pwd; whoami").stdout == "/home/user/app\nuser\n"
        assert run("cat greeting.txt who.txt /root-made.txt").stdout == "hello from the build\nuser\nroot\n"
        assert run("echo ${GREETING:-unset}").stdout == "unset\n"
        copied = run("cd /home/user/folder && cat a.txt deeper/b.txt relative && readlink relative absolute dangling")
        assert copied.stdout == "copied\ndeeper\ncopied\na.txt\n/etc/hostname\nnowhere\n"
        assert run("stat -c '%U' /home/user/folder/a.txt; tool.sh; stat -c '%U %a' /usr/local/bin/tool.sh").stdout == "user\ntool ran\nroot 755\n"
        # The start command runs in the sandbox, restored from the template's snapshot.
        page = run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/")
        assert page.stdout == "200"
        assert sandbox.get_info().template_id == info.template_id
    finally:
        sandbox.kill()

    # Tags: the build's own, one more on it, then that one removed.
    assigned = Template.assign_tags("sdk-app:v1", "stable")
    assert assigned.tags == ["stable"]
    assert str(assigned.build_id) == info.build_id
    tags = {tag.tag: str(tag.build_id) for tag in Template.get_tags("sdk-app")}
    assert tags == {"v1": info.build_id, "stable": info.build_id}
    Template.remove_tags("sdk-app", "stable")
    assert [tag.tag for tag in Template.get_tags(info.template_id)] == ["v1"]


def test_a_failing_step_fails_the_build_with_its_output(wrenn):
    template = (
        Template()
        .from_template("base")
        .run_cmd("echo fine")
        .run_cmd("echo about to fail >&2; exit 7")
        .run_cmd("echo never reached")
    )
    logs = []
    with pytest.raises(BuildException) as failed:
        Template.build(template, "sdk-broken", on_build_logs=logs.append)
    said = str(failed.value)
    assert "exited with code 7" in said, said
    assert "about to fail" in said, said
    messages = [entry.message for entry in logs]
    assert "never reached" not in messages
    # A template whose only build failed has nothing to start from.
    with pytest.raises(Exception) as refused:
        Sandbox.create("sdk-broken", timeout=60)
    assert "no ready build" in str(refused.value)


def test_another_team_cannot_run_or_take_a_teams_template(wrenn):
    Template.build(Template().from_template("base").run_cmd("true"), "sdk-private")
    other_key = wrenn.new_team_key("template-outsiders")
    # It exists (the name is taken), but is not theirs to run or to build.
    assert Template.exists("sdk-private", api_key=other_key)
    with pytest.raises(SandboxException) as refused:
        Sandbox.create("sdk-private", api_key=other_key, timeout=60)
    assert "404: template 'sdk-private' not found" in str(refused.value)
    with pytest.raises(BuildException) as taken:
        Template.build(Template().from_template("base"), "sdk-private", api_key=other_key)
    assert "taken by another team" in str(taken.value)


def test_the_cli_builds_a_dockerfile_lists_tags_and_deletes_it(wrenn, tmp_path):
    import json
    import os
    import subprocess

    env = dict(os.environ, WRENN_API_URL=wrenn.api_url, WRENN_API_KEY=wrenn.key)

    def cli(*args, check=True):
        return subprocess.run([wrenn.binary, "template", *args], capture_output=True, text=True,
                              timeout=600, env=env, check=check)

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "about.html").write_text("copied by the cli\n")
    (tmp_path / "site" / "link.html").symlink_to("about.html")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho cli tool\n")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM base\n"
        "ARG GREETING=hello\n"
        "WORKDIR /home/user/site\n"
        "COPY site/ /home/user/site/\n"
        "COPY --chown=root --chmod=750 tool.sh /usr/local/bin/\n"
        "RUN echo \"$GREETING from the cli\" > index.html \\\n"
        "    && echo step-output\n"
        'CMD ["python3", "-m", "http.server", "8000"]\n'
    )
    # wrenn up keeps its template store in its data directory: the build is put there.
    import glob
    stored = lambda: set(glob.glob(os.path.join(wrenn.data, "template-store", "templates", "*.json")))
    before = stored()
    built = cli("build", "-f", str(dockerfile), "--name", "cli-app:v2", "--ready-cmd",
                "[ -n \"$(ss -Htln sport = :8000)\" ]")
    assert "step-output" in built.stdout, built.stdout
    put = stored() - before
    assert len(put) == 1, (before, stored())
    assert "built cli-app:v2" in built.stdout, built.stdout
    listed = json.loads(cli("list", "--json").stdout)
    mine = [t for t in listed if t["aliases"] == ["cli-app"]]
    assert len(mine) == 1 and mine[0]["buildStatus"] == "ready", listed
    tags = json.loads(cli("tags", "cli-app", "--json").stdout)
    assert [t["tag"] for t in tags] == ["v2"]

    sandbox = Sandbox.create("cli-app:v2", timeout=120)
    try:
        page = sandbox.commands.run("curl -s http://127.0.0.1:8000/index.html")
        assert page.stdout == "hello from the cli\n"
        copied = sandbox.commands.run(
            "curl -s http://127.0.0.1:8000/link.html; readlink link.html; stat -c '%U %a' /usr/local/bin/tool.sh",
            user="root")
        assert copied.stdout == "copied by the cli\nabout.html\nroot 750\n"
        # Deleted while its sandbox runs: gone for the API at once, the sandbox goes on (its
        # host keeps its copy, and the store the template, until the sandbox is gone).
        cli("delete", "cli-app")
        assert not Template.exists("cli-app")
        assert sandbox.commands.run("cat index.html").stdout == "hello from the cli\n"
        assert put <= stored(), "kept while the sandbox uses it"
    finally:
        sandbox.kill()

    globbing = tmp_path / "Glob.Dockerfile"
    globbing.write_text("FROM base\nCOPY *.sh /app/\n")
    refused = cli("build", "-f", str(globbing), "--name", "cli-glob", check=False)
    assert refused.returncode != 0
    assert "Dockerfile line 2 (COPY): *.sh: globs are not supported" in refused.stderr, refused.stderr


def registries():
    """The registries scripts/registry.sh started (open, private, "user:password"), or a failure
    saying how to start them."""
    import os

    names = ("WRENN_TEST_REGISTRY", "WRENN_TEST_PRIVATE_REGISTRY", "WRENN_TEST_REGISTRY_LOGIN")
    values = [os.environ.get(name) for name in names]
    if not all(values):
        pytest.fail(f"{', '.join(names)} are not set: run scripts/registry.sh (scripts/test.sh does)",
                    pytrace=False)
    open_registry, private_registry, login = values
    username, password = login.split(":", 1)
    return open_registry, private_registry, username, password


def test_a_template_from_a_registry_image_has_its_files_user_and_workdir(wrenn):
    open_registry, _, _, _ = registries()
    template = (
        Template()
        .from_image(f"{open_registry}/wrenn-test/busybox:v1")
        .run_cmd("echo \"$WRENN_IMAGE_ENV, $(id -un) in $(pwd)\" > made-by-sdk.txt")
    )
    logs = []
    Template.build(template, "sdk-from-image", on_build_logs=logs.append)
    messages = [entry.message for entry in logs]
    assert any(m.startswith("pulling ") for m in messages), messages
    # The same build again hits the cache: no step runs; its sandboxes are the same.
    logs = []
    Template.build(template, "sdk-from-image:again", on_build_logs=logs.append)
    messages = [entry.message for entry in logs]
    assert any(m.startswith("cached: the same build as template") for m in messages), messages
    assert not any(m.startswith("the VM is up") for m in messages), messages
    sandbox = Sandbox.create("sdk-from-image:again", timeout=120)
    try:
        run = sandbox.commands.run
        # The image's USER and WORKDIR are the sandbox's, and the step ran as them with its ENV.
        assert run("whoami; pwd; cat made-by-sdk.txt").stdout == "app\n/app\nfrom-image, app in /app\n"
        # The layers as stacked: the second's whiteouts removed the first's files.
        listing = run("cat /usr/share/wrenn-test/hello; ls /opt/lower; ls /etc/layer-one-gone 2>&1 || true")
        assert listing.stdout.startswith("kept from layer one\nnew\n"), listing.stdout
        assert "No such file" in listing.stdout, listing.stdout
        sandbox.files.write("/app/written.txt", "through envd\n")
        assert sandbox.files.read("/app/written.txt") == "through envd\n"
    finally:
        sandbox.kill()

    # A build that adds a step starts from the disk the first one's step left: only its own
    # step runs.
    logs = []
    Template.build(template.run_cmd("echo extra > extra.txt"), "sdk-from-image:more",
                   on_build_logs=logs.append)
    messages = [entry.message for entry in logs]
    assert any(m.startswith("cached: steps 1 to 1 as template") for m in messages), messages
    assert any(m.startswith("the VM is up") for m in messages), messages
    sandbox = Sandbox.create("sdk-from-image:more", timeout=120)
    try:
        assert sandbox.commands.run("cat made-by-sdk.txt extra.txt").stdout == \
            "from-image, app in /app\nextra\n"
    finally:
        sandbox.kill()


def test_a_private_image_needs_its_login_and_an_unknown_image_is_an_error(wrenn):
    open_registry, private_registry, username, password = registries()
    private_image = f"{private_registry}/wrenn-test/private:v1"
    with pytest.raises(BuildException) as refused:
        Template.build(Template().from_image(private_image), "sdk-private-image")
    assert "needs credentials" in str(refused.value), str(refused.value)
    with pytest.raises(BuildException) as refused:
        Template.build(Template().from_image(private_image, username=username, password="wrong"),
                       "sdk-private-image")
    assert "refused the credentials" in str(refused.value), str(refused.value)
    with pytest.raises(BuildException) as unknown:
        Template.build(Template().from_image(f"{open_registry}/wrenn-test/nothing:v1"), "sdk-no-image")
    assert "has no image" in str(unknown.value), str(unknown.value)

    info = Template.build(Template().from_image(private_image, username=username, password=password),
                          "sdk-private-image")
    sandbox = Sandbox.create(info.template_id, timeout=120)
    try:
        assert sandbox.commands.run("cat /app/marker").stdout == "from layer two\n"
    finally:
        sandbox.kill()


def test_the_sdks_default_base_image_and_a_dockerfile_from_an_image(wrenn):
    open_registry, _, _, _ = registries()
    # from_base_image() is e2bdev/base (the default of a Template()): wrenn's base template.
    Template.build(Template().from_base_image().run_cmd("echo on-base > /home/user/default.txt"),
                   "sdk-default-base")
    dockerfile = (
        f"FROM {open_registry}/wrenn-test/busybox:v1\n"
        "RUN echo \"dockerfile as $(id -un) in $(pwd)\" > /made.txt\n"
        "ENV NOT_KEPT=1\n"
    )
    Template.build(Template().from_dockerfile(dockerfile), "sdk-dockerfile-image")
    for name, script, expected in [
        ("sdk-default-base", "cat /home/user/default.txt; python3 --version | cut -c1-7", "on-base\nPython \n"),
        # The SDK runs a Dockerfile's steps as root in /, and its sandboxes as user in /home/user.
        ("sdk-dockerfile-image", "cat /made.txt; whoami; pwd", "dockerfile as root in /\nuser\n/home/user\n"),
    ]:
        sandbox = Sandbox.create(name, timeout=120)
        try:
            assert sandbox.commands.run(script).stdout == expected
        finally:
            sandbox.kill()


def test_the_cli_builds_a_dockerfile_from_an_image(wrenn, tmp_path):
    import os
    import subprocess

    open_registry, _, _, _ = registries()
    env = dict(os.environ, WRENN_API_URL=wrenn.api_url, WRENN_API_KEY=wrenn.key)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {open_registry}/wrenn-test/busybox:v1\nRUN id -un > /who.txt\n")
    built = subprocess.run([wrenn.binary, "template", "build", "-f", str(dockerfile), "--name", "cli-image"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stderr
    # An image's Dockerfile starts as root in / and ends as user in /home/user, as in the SDKs.
    for line in [f"pulling {open_registry}/wrenn-test/busybox:v1", "[1/5] USER root", "[2/5] WORKDIR /",
                 "[4/5] USER user", "[5/5] WORKDIR /home/user", "built cli-image"]:
        assert line in built.stdout, built.stdout


def test_deleting_a_template_while_it_builds_cancels_the_build(wrenn):
    import os
    import subprocess
    import time

    template = Template().from_template("base").run_cmd("echo the-long-step-began; sleep 600")
    info = Template.build_in_background(template, "sdk-cancelled")
    deadline = time.time() + 300
    seen = []
    while not any("the-long-step-began" in entry.message for entry in seen):
        status = Template.get_build_status(info, logs_offset=len(seen))
        seen.extend(status.log_entries)
        assert status.status.value == "building", (status, seen)
        assert time.time() < deadline, seen
        time.sleep(0.5)

    env = dict(os.environ, WRENN_API_URL=wrenn.api_url, WRENN_API_KEY=wrenn.key)
    subprocess.run([wrenn.binary, "template", "delete", "sdk-cancelled"], capture_output=True,
                   text=True, timeout=120, env=env, check=True)
    assert not Template.exists("sdk-cancelled")
    # The host stopped the build: its VM and its template's directory go.
    build_dir = os.path.join(wrenn.data, "agent", "templates", "b" + info.build_id.replace("-", ""))
    deadline = time.time() + 60
    while os.path.exists(build_dir):
        assert time.time() < deadline, f"{build_dir} is still there"
        time.sleep(0.5)
    running = subprocess.run(["pgrep", "-f", build_dir], capture_output=True, text=True)
    assert running.stdout == "", running.stdout
