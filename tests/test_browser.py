"""The MLflow UI as a user meets it, in real headless Chromium (Debian's chromium and chromium-driver; .ci/run
installs them) against a real `mlflow server` on a smoke sweep's store. The screenshots land in
tests/screenshots/ (git-ignored), for a person to look at."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT
from conftest import mlflow_runs as runs_of
from conftest import run_sweep as sweep

pytestmark = pytest.mark.slow
SHOTS = ROOT / "tests" / "screenshots"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)  # .ci/run installs them: missing there is a broken setup
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No background traffic: this machine's network is closed, and Chromium would keep knocking.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A smoke sweep of dropout-ablation (4 trials, synthetic data) and `mlflow server` on its store."""
    from tune import tracking

    cwd = tmp_path_factory.mktemp("ui")
    p = sweep(cwd, "dropout-ablation", "--smoke", "--data", "synthetic", "--set", "epochs=2", "--set", "limit=600",
              "--set", "eval_limit=300", "--set", "mlp.hidden=32", "--set", "cnn.channels=4,8", "--verbose", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(PYTHON).with_name("mlflow")), "server", "--backend-store-uri",
                               f"sqlite:///{cwd}/mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        tracking.check_reachable(url, wait=120)
        yield cwd, url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def wait_for_text(driver, needle: str, timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while True:
        text = driver.find_element(By.TAG_NAME, "body").text
        if needle in text or time.time() > deadline:
            return text
        time.sleep(0.5)


def shoot(driver, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_the_printed_link_opens_the_runs_table_with_readable_names_and_the_sweep(served, browser):
    from selenium.webdriver.common.by import By

    from tune import tracking

    cwd, url = served
    client, trials = runs_of(cwd, "dropout-ablation")
    exp_id = client.get_experiment_by_name("dropout-ablation").experiment_id
    [parent] = client.search_runs([exp_id], "tags.run_kind = 'sweep'")
    link = tracking.runs_view(url, exp_id)  # the link make mlflow-ui, make sweep and make report print
    assert link in "\n".join(tracking.experiment_links(client, url, ["dropout-ablation"]))

    browser.get(link)
    text = wait_for_text(browser, parent.info.run_name)
    shoot(browser, "1-runs-table")
    # the runs table, not the GenAI overview ("Traces: 0", "Detect issues in your traces")
    assert parent.info.run_name in text and "Run Name" in text and "Detect issues" not in text, text[:2000]
    # the trials are nested under the sweep's run: open it, and their readable names show
    [expand] = browser.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")
    expand.click()
    names = sorted(r.info.run_name for r in trials)
    assert names == ["cnn d=0 bn,relu,pool s0", "cnn d=0.5 bn,relu,dropout,pool s0", "mlp d=0 bn,relu s0",
                     "mlp d=0.8 bn,relu,dropout s0"]
    text = wait_for_text(browser, names[-1])
    shoot(browser, "2-sweep-expanded")
    assert all(name in text for name in names), text[:2000]


def test_the_sweep_run_shows_its_summary(served, browser):
    from tune import tracking

    cwd, url = served
    client, _ = runs_of(cwd, "dropout-ablation")
    exp_id = client.get_experiment_by_name("dropout-ablation").experiment_id
    [parent] = client.search_runs([exp_id], "tags.run_kind = 'sweep'")
    browser.set_window_size(1600, 2600)  # the description sits below the run's overview
    browser.get(tracking.run_view(url, exp_id, parent.info.run_id))
    text = wait_for_text(browser, "Outcome")
    shoot(browser, "3-sweep-run")
    from selenium.webdriver.common.by import By

    for more in browser.find_elements(By.XPATH, "//*[text()='Show more']"):
        more.click()
    text = wait_for_text(browser, "Settings")
    # its description: settings, then the outcome with each group's best; its params hold the settings
    assert "Sweep of dropout-ablation" in text and "Outcome" in text and "dropout-ablation/mlp" in text, text[:3000]
    assert "max_trial_epochs" in text and "mlp d=0.8 bn,relu,dropout s0" in text, text[:3000]  # params, child runs


def test_screenshots_folder_is_ignored_by_git():
    assert shutil.which("git")
    p = subprocess.run(["git", "check-ignore", "-q", "tests/screenshots/x.png"], cwd=ROOT)
    assert p.returncode == 0, "tests/screenshots/ must be git-ignored"
