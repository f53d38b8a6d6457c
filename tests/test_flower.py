"""Flower on a running farm, in a real headless Chromium: the worker and a finished task
appear, the prompt does not, and pages need the password. The screenshot is kept in
test-artifacts/."""

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

import farm
from tests.conftest import ARTIFACTS, IN_CI, MODEL, free_port

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
]


def chromium(tmp_path, *args: str) -> str:
    binary = shutil.which("chromium")
    if binary is None:
        if IN_CI:
            pytest.fail("Debian's chromium is required when CI=true")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    # A profile of its own each time: no run waits on the lock or the saved table state
    # of the one before.
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    r = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    return r.stdout


@pytest.fixture
def flower(live_farm, tmp_path):
    port = free_port()
    env = {**live_farm.env, "FARM_FLOWER_PASSWORD": "s3cret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "flower", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthcheck", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, "farm flower exited"
            assert time.monotonic() < deadline, "Flower did not come up"
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(30)


def test_flower_shows_the_worker_and_a_finished_task_without_its_prompt(
    farm_client, flower, tmp_path
):
    secret_prompt = "my private question about the sky"
    auth = {"Authorization": "Basic " + base64.b64encode(b"farm:s3cret").decode()}

    def flower_has(job_id: str) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{flower}/api/tasks", headers=auth)
        with urllib.request.urlopen(request, timeout=10) as r:
            task = json.loads(r.read()).get(job_id)
        # Its name comes with its first event (task-received): a job whose first events
        # came before Flower listened shows in Flower unnamed.
        return task is not None and task.get("name") == "farm.generate"

    # Flower answers /healthcheck before its event receiver runs: a job finished before
    # that is never seen, or seen only in part. Run jobs until Flower has captured one whole.
    for _ in range(10):
        c = farm.infer(secret_prompt, model=MODEL, max_tokens=4, timeout=60)
        deadline = time.monotonic() + 5
        while not flower_has(c.job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        if flower_has(c.job_id):
            break
    else:
        pytest.fail("Flower captured none of 10 jobs' events")

    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://127.0.0.1:{flower}/workers", timeout=5)
    assert denied.value.code == 401

    base = f"http://farm:s3cret@127.0.0.1:{flower}"
    workers_page = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"{base}/workers")
    assert c.worker in workers_page
    # The tasks table is filled by the page's own script (a POST to /tasks/datatable): on a
    # busy machine that can outlast a virtual time budget. Wait for it, up to a minute.
    deadline = time.monotonic() + 60
    while True:
        tasks_page = chromium(
            tmp_path, "--virtual-time-budget=15000", "--dump-dom", f"{base}/tasks"
        )
        if c.job_id in tasks_page or time.monotonic() > deadline:
            break
        time.sleep(1)
    rows = tasks_page[tasks_page.find("<tbody") : tasks_page.rfind("</tbody>")]
    assert c.job_id in rows and "farm.generate" in rows, rows[-3000:] or tasks_page[-3000:]
    task_page = chromium(
        tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"{base}/task/{c.job_id}"
    )
    assert "prompt of 33 chars" in task_page and secret_prompt not in task_page

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, "--virtual-time-budget=15000", f"--screenshot={shot}", f"{base}/tasks")
    assert shot.stat().st_size > 10_000
