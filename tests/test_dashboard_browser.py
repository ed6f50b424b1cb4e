"""The dashboard in a real headless Chromium, over a live local cluster.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and selenium; skipped with a reason without them.
Nothing is downloaded at test time.  The browser watches a gated computation
go from waiting to done, a killed leader replica marked down and a new leader
named, and one task's detail; a screenshot is left in the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasksprint.localcluster import free_ports
from tests.monitor_cluster import WAIT_SECONDS, gated_run, http_get, open_gate, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

TASKS = 8


@pytest.fixture
def browser(tmp_path: Path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--no-sandbox",
        "--headless",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver
        service.stop()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def text(driver, selector: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, selector).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def click(driver, selector: str) -> bool:
    """Click the element if it is there (the table is re-rendered at every poll: try again if it went)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()
    except (NoSuchElementException, StaleElementReferenceException):
        return False
    return True


def test_the_dashboard_shows_a_computation_a_failover_and_a_task(tmp_path: Path, browser) -> None:

    with gated_run(tmp_path / "run", TASKS) as run:
        cluster = run.cluster
        assert cluster is not None
        (port,) = free_ports(1)
        dash = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasksprint.cli",
                "dashboard",
                "--coordinators",
                cluster.peers_arg,
                "--secret-file",
                str(cluster.secret_file),
                "--listen",
                f"127.0.0.1:{port}",
                "--interval",
                "0.3",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "dashboard.log", "wb"),  # noqa: SIM115 -- closed with the process
            env={**os.environ},
        )
        try:
            url = f"http://127.0.0.1:{port}/"

            def serving() -> bool:
                try:
                    return http_get(url + "api/snapshot")[0] == 200
                except OSError:
                    assert dash.poll() is None, (tmp_path / "dashboard.log").read_text()
                    return False

            wait_for(serving, "the dashboard to serve")
            browser.set_page_load_timeout(WAIT_SECONDS)
            browser.get(url + "#tasks")

            # Waiting: every task created, none done.
            wait_for(lambda: text(browser, "#run-state") == "running", "the page to show the computation")
            wait_for(lambda: text(browser, "#task-counts tr[data-state=total] .count") == str(TASKS), "all tasks")
            # (The page re-renders at every poll: read until a rendering is caught; the gate is shut.)
            wait_for(lambda: text(browser, "#task-counts tr[data-state=done] .count") == "0", "no task done")
            wait_for(lambda: text(browser, "#done") == "0", "the summary's done count")

            open_gate(run)
            wait_for(lambda: text(browser, "#task-counts tr[data-state=done] .count") == str(TASKS), "tasks done")
            wait_for(lambda: text(browser, "#run-state") == "finished", "the computation to finish")

            # One task's detail, from the table.
            wait_for(lambda: click(browser, "#tasks tr[data-tid='3']"), "a click on task 3 in the table")
            wait_for(lambda: text(browser, "#task-detail-fields dd[data-field=state]") == "done", "task 3's detail")
            assert text(browser, "#task-detail-fields dd[data-field=tid]") == "3"  # the detail is not re-rendered
            assert text(browser, "#task-detail-title") == "Task 3"

            # Fail-over: kill the leader; the page marks it down and names another leader.
            browser.get(url + "#cluster")
            leader_text = wait_for(
                lambda: text(browser, "#leader").startswith("replica ") and text(browser, "#leader"), "a leader"
            )
            old = int(leader_text.split()[1])
            cluster.kill(old)
            wait_for(lambda: text(browser, f"#replicas tr[data-replica='{old}'] .status") == "down", "the replica down")
            new = wait_for(
                lambda: (t := text(browser, "#leader")).startswith("replica ") and t != leader_text and t,
                "a new leader",
            )
            assert int(new.split()[1]) != old
            wait_for(
                lambda: text(browser, f"#replicas tr[data-replica='{new.split()[1]}'] .role") == "leader", "its role"
            )
            wait_for(
                lambda: str(old) not in text(browser, "#leader-changes li:last-child").split()[-1:], "the change listed"
            )
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            assert (tmp_path / "dashboard.png").stat().st_size > 0
        finally:
            dash.terminate()
            try:
                dash.wait(10)
            except subprocess.TimeoutExpired:
                dash.kill()
                dash.wait()
