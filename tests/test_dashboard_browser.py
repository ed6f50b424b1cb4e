"""The dashboard in a real headless Chromium, over a live local cluster.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and selenium; skipped with a reason without them.
Nothing is downloaded at test time.  The browser watches a gated computation
(gated tasks and a reduce reading them all) go from waiting to done in the
table and in the DAG, the workers' memory and last contact, a search of the
task table, one task's detail, a batch status file as a table, and a killed
leader replica marked down and a new leader named.  Screenshots are left in
the test's tmp dir (``dashboard.png``, ``dag.png``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasksprint.localcluster import free_ports
from tests.monitor_cluster import WAIT_SECONDS, gated_run, http_get, open_gate, open_reduce_gate, wait_for

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


def count(driver, selector: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def attr(driver, selector: str, name: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, selector).get_attribute(name) or ""
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


# A batch run's status file: two tasks, one failed, and a line that is not a status line.
STATUS_FILE = (
    "    \t0\t1\t-1\tnode-a\t101\t0\t1.500\t100.000\t101.500\t0\t''\t0\t''\techo one\n"
    "R  E \t1\t2\t-1\tnode-b\t102\t3\t0.250\t100.000\t100.250\t0\t''\t5\t'oops\\n'\texit 3\n"
    "not a status line\n"
)


def test_the_dashboard_shows_a_computation_a_failover_and_a_task(tmp_path: Path, browser) -> None:
    total = TASKS + 2  # the gated tasks, the reduce and a command task
    reduce, command = TASKS + 1, TASKS + 2
    status_file = tmp_path / "status.txt"
    status_file.write_text(STATUS_FILE)
    with gated_run(tmp_path / "run", TASKS, reduce=True, command=True) as run:
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
                "--status-file",
                str(status_file),
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
            wait_for(lambda: text(browser, "#task-counts tr[data-state=total] .count") == str(total), "all tasks")
            # (The page re-renders at every poll: read until a rendering is caught; the gate is shut.)
            wait_for(lambda: text(browser, "#task-counts tr[data-state=done] .count") == "0", "no task done")
            wait_for(lambda: text(browser, "#done") == "0", "the summary's done count")
            waiting = ("pending", "running")
            wait_for(lambda: text(browser, "#tasks tr[data-tid='3'] .state") in waiting, "task 3 waiting")
            wait_for(lambda: text(browser, f"#tasks tr[data-tid='{reduce}'] .state") in waiting, "the reduce waiting")
            # The search, by name: only the reduce.
            browser.find_element("css selector", "#task-filter").send_keys("add")
            wait_for(lambda: count(browser, "#tasks tbody tr") == 1, "only the reduce found")
            wait_for(lambda: text(browser, "#tasks tbody tr .state") in waiting, "the reduce found waiting")

            # The workers: memory and last contact as the client reported them.
            browser.get(url + "#workers")
            wait_for(lambda: text(browser, "#workers tbody tr .rss").endswith("MiB"), "a worker's memory")
            wait_for(lambda: text(browser, "#workers tbody tr .heard").endswith("s ago"), "a worker's last contact")

            # The DAG: every task a node, edges from the gated tasks into the reduce.
            browser.get(url + "#dag")
            wait_for(lambda: count(browser, "#dag-svg circle.node") == total, "the DAG's nodes")
            # (The drawing is redone at every poll: each reading is retried until it catches one.)
            wait_for(lambda: attr(browser, f"#dag-svg circle[data-tid='{reduce}']", "data-state") in waiting, "reduce")
            wait_for(lambda: attr(browser, "#dag-svg path.edges", "d").count("M") == TASKS, "an edge per input")
            # The reduce is drawn in a column of its own, to the right of the tasks it reads.
            reduce_x = wait_for(lambda: attr(browser, f"#dag-svg circle[data-tid='{reduce}']", "cx"), "its place")
            first_x = wait_for(lambda: attr(browser, "#dag-svg circle[data-tid='1']", "cx"), "task 1's place")
            assert float(reduce_x) > float(first_x)
            wait_for(lambda: attr(browser, "#dag-svg circle[data-tid='1']", "data-state") in waiting, "task 1 waiting")

            open_gate(run)
            open_reduce_gate(run)
            wait_for(lambda: count(browser, "#dag-svg circle.node.done") == total, "every DAG node done")
            browser.save_screenshot(str(tmp_path / "dag.png"))
            browser.get(url + "#tasks")
            wait_for(lambda: text(browser, "#task-counts tr[data-state=done] .count") == str(total), "tasks done")
            wait_for(lambda: text(browser, "#run-state") == "finished", "the computation to finish")
            # The search still in place: the reduce, now done; then every done task.
            wait_for(lambda: text(browser, "#tasks tbody tr .state") == "done", "the reduce found done")
            assert count(browser, "#tasks tbody tr") == 1
            browser.find_element("css selector", "#task-filter").clear()
            browser.find_element("css selector", "#task-filter").send_keys("state:done")
            wait_for(lambda: count(browser, "#tasks tbody tr") == total, "every task found done")

            # One task's detail, from the table.
            wait_for(lambda: click(browser, "#tasks tr[data-tid='3']"), "a click on task 3 in the table")
            wait_for(lambda: text(browser, "#task-detail-fields dd[data-field=state]") == "done", "task 3's detail")
            assert text(browser, "#task-detail-fields dd[data-field=tid]") == "3"  # the detail is not re-rendered
            assert text(browser, "#task-detail-title") == "Task 3"
            wait_for(lambda: text(browser, "#task-detail-run dd[data-field=run-state]") == "done", "its run state")
            # The reduce's detail, from the DAG: what it read.
            browser.get(url + "#dag")
            wait_for(lambda: click(browser, f"#dag-svg circle[data-tid='{reduce}']"), "a click on the reduce")
            wait_for(lambda: text(browser, "#task-detail-title") == f"Task {reduce}", "the reduce's detail")
            wait_for(lambda: text(browser, "#task-detail-fields dd[data-field=name]") == "add", "its name")
            reads = str(list(range(1, TASKS + 1))).replace(" ", "")
            wait_for(lambda: text(browser, "#task-detail-fields dd[data-field=pretasks]") == reads, "what it reads")

            # A command task's run record: times, exit, limits, usage, output tail.
            browser.get(url + f"#task/{command}")
            wait_for(lambda: text(browser, "#task-detail-run dd[data-field=exit_code]") == "0", "its exit code")
            assert text(browser, "#task-detail-run dd[data-field=verdict]") == "ok"
            assert "wall_time_s=60" in text(browser, "#task-detail-run dd[data-field=limits]")
            assert text(browser, "#task-detail-run dd[data-field=started]") != "-"
            assert text(browser, "#task-detail-run dd[data-field=elapsed]").endswith(" s")
            assert "tail-marker" in text(browser, "#task-detail-stdout")
            assert "to-stderr" in text(browser, "#task-detail-stderr")

            # The batch status file as a table; the unreadable line is listed, not fatal.
            browser.get(url + "#batch")
            wait_for(lambda: count(browser, "#batch-records tbody tr") == 2, "the status file's two lines")
            wait_for(lambda: text(browser, "#batch-records tr[data-task='1'] .exit") == "3", "the failed line's exit")
            wait_for(lambda: "line 3" in text(browser, "#batch-rejected"), "the unreadable line listed")
            browser.find_element("css selector", "#batch-filter").send_keys("exit:3")
            wait_for(lambda: count(browser, "#batch-records tbody tr") == 1, "the failed line found")

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
