"""`vitlab serve` as a user runs it: the command prints its URL, a stalled or vanished client holds
nothing, and the page works in a real browser (Debian's headless Chromium through Selenium; never a
browser download). A screenshot is saved; ``VITLAB_SERVE_SCREENSHOT=docs/serve.png`` keeps a copy
and ``VITLAB_SERVE_IMAGE=photo.jpg`` uploads that image instead of the drawn one."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")

NAME = "vit_conv_32px.vitlab_cifar10"


@pytest.fixture(scope="module")
def server():
    """``vitlab serve`` on a free port: (URL, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", "--model", NAME, "--port", "0",
                             "--read-timeout-s", "0.5", "--no-access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "VITLAB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()  # the first line is the URL, printed before it serves
        assert line.startswith(f"serving {NAME} at http://127.0.0.1:"), line + proc.stdout.read(2000)
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stalled_and_vanished_clients_hold_nothing(server):
    url, proc = server
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: 100000\r\n\r\n--b\r\n").encode()
    gone = socket.create_connection((host, int(port)))
    gone.sendall(head)
    gone.close()  # vanished mid-upload
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(head)  # and never sends the rest
    t = time.perf_counter()
    assert urllib.request.urlopen(url + "healthz", timeout=5).status == 200  # answered meanwhile
    stalled.settimeout(10)
    answer = b""
    while chunk := stalled.recv(4096):  # headers and body may come in separate segments (TCP_NODELAY)
        answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "paused over 0.5 s" in answer
    assert time.perf_counter() - t < 5
    stalled.close()
    assert proc.poll() is None


def chromium() -> tuple[str, str]:
    """(browser, driver) of Debian's chromium and chromium-driver; fail where apt-get could install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get"):
        pytest.fail("chromium or chromedriver is missing: `make test` installs Debian's chromium and "
                    "chromium-driver (apt-get install -y chromium chromium-driver)")
    pytest.skip("no chromium and chromedriver, and no apt-get to install Debian's packages")


def drawn_image(path: Path) -> Path:
    image = Image.new("RGB", (160, 120), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 80, 160, 120), fill=(70, 120, 60))
    draw.polygon([(30, 70), (130, 60), (140, 75), (40, 85)], fill=(230, 230, 235))
    image.save(path)
    return path


def test_the_page_in_headless_chromium(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser, driver_path = chromium()
    url, _ = server
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1050", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    state = lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: state() in ("ready", "error"))
        assert state() == "ready", driver.find_element(By.ID, "error").text
        assert NAME in driver.find_element(By.ID, "model-name").text
        assert "2,335,018" in driver.find_element(By.ID, "card-table").text

        image = Path(os.environ.get("VITLAB_SERVE_IMAGE") or drawn_image(tmp_path / "plane.png"))
        driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
        WebDriverWait(driver, 60).until(lambda d: state() in ("done", "error"))
        assert state() == "done", driver.find_element(By.ID, "error").text

        rows = driver.find_elements(By.CSS_SELECTOR, "#predictions li")
        labels = [r.find_element(By.CLASS_NAME, "label").text for r in rows]
        assert len(rows) == 5 and set(labels) <= {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"}
        widths = [float(r.find_element(By.CSS_SELECTOR, ".bar div").get_attribute("style").split(":")[1]
                        .strip(" %;")) for r in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0

        spread = ("const c = document.getElementById(arguments[0]), d = c.getContext('2d')"
                  ".getImageData(0, 0, c.width, c.height).data; let lo = 255, hi = 0;"
                  "for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }"
                  "return c.dataset.drawn === '1' ? hi - lo : -1;")
        assert driver.execute_script(spread, "rollout") > 50  # the overlay is drawn, and it is not flat
        assert len(driver.find_elements(By.CSS_SELECTOR, "#heads canvas")) == 3
        before = driver.execute_script("return document.getElementById('head-map').toDataURL()")
        Select(driver.find_element(By.ID, "layer")).select_by_index(0)
        Select(driver.find_element(By.ID, "head")).select_by_value("1")
        assert driver.execute_script("return document.getElementById('head-map').toDataURL()") != before
        Select(driver.find_element(By.ID, "layer")).select_by_index(5)
        WebDriverWait(driver, 10).until(
            lambda d: d.execute_script("return document.getElementById('posemb').naturalWidth") > 0)

        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        if keep := os.environ.get("VITLAB_SERVE_SCREENSHOT"):
            shutil.copy(shot, keep)
    finally:
        driver.quit()
