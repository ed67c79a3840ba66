"""The review page in a real headless browser: log in, open the queue, correct a grade, get the re-rendered
PDF. Selenium drives the system's Chromium and chromedriver (Debian packages ``chromium`` and
``chromium-driver``, installed by scripts/system-deps.sh); nothing is downloaded. Skips with the reason
where they are missing."""

from __future__ import annotations

import shutil
import threading
import urllib.request
from io import BytesIO

import pytest

from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.web.app import create_app
from screening.web.auth import hash_password

from ..conftest import TEMPLATES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs the system's chromium and chromedriver (apt-get install chromium chromium-driver; "
                              "scripts/system-deps.sh does it as root)"),
]
PASSWORD = "correct horse battery"


@pytest.fixture
def server(worked):
    """The review page, login required, on a free loopback port, served by waitress in a thread."""
    from waitress import wasyncore
    from waitress.server import create_server

    with session_scope(worked.factory) as s:
        rrepo.add_user(s, "grey", "Dr A. Grey", hash_password(PASSWORD))
    app = create_app(worked.settings, worked.factory, TEMPLATES, require_login=True, loopback=True)
    srv = create_server(app, host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.effective_port}", worked
    # closed from the server's own loop thread (waitress runs a trigger's thunks there): closing its sockets from
    # this thread could pull them from under a select() in progress (EBADF in the server thread, seen once)
    srv.trigger.pull_trigger(lambda: wasyncore.close_all(srv._map))
    thread.join(timeout=10)
    srv.task_dispatcher.shutdown()  # the loop's end leaves waitress's request threads running
    assert not thread.is_alive(), "the review server's loop did not stop"


@pytest.fixture
def browser(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_log_in_open_the_queue_correct_a_grade_and_get_the_reviewed_pdf(server, browser, tmp_path):
    from pypdf import PdfReader
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)  # a click returns before the next page has loaded: wait for it

    base, worked = server
    exam_id = worked.exams["P1"]
    browser.get(f"{base}/queue")
    assert "/login" in browser.current_url  # the queue needs a login here
    browser.find_element(By.ID, "username").send_keys("grey")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait.until(EC.url_to_be(f"{base}/queue"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
    assert len(rows) == 2 and "Signed in as Dr A. Grey" in browser.find_element(By.TAG_NAME, "header").text
    browser.find_element(By.LINK_TEXT, f"Visit {exam_id}").click()
    wait.until(EC.url_to_be(f"{base}/visits/{exam_id}"))
    wait.until(lambda b: b.execute_script("return document.readyState") == "complete")
    photos = browser.find_elements(By.CSS_SELECTOR, "figure.full img")
    assert len(photos) == 4 and all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in photos)

    dr_right = Select(browser.find_element(By.ID, "dr_R"))
    model_grade = int(dr_right.first_selected_option.get_attribute("value"))
    corrected = (model_grade + 1) % 5
    dr_right.select_by_value(str(corrected))
    Select(browser.find_element(By.ID, "gradable_L")).select_by_value("no")
    browser.find_element(By.ID, "comment").send_keys("IRMA superotemporal <check>")
    browser.find_element(By.ID, "correct").click()
    flash = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".flash")))  # after the PDF is rendered

    assert browser.current_url == f"{base}/visits/{exam_id}"
    assert "Signed off (corrected). The reviewed report is version 2." in flash.text
    assert "corrected by Dr A. Grey" in browser.find_element(By.ID, "status").text
    assert "IRMA superotemporal <check>" in browser.find_element(By.ID, "history").text
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 200)
    browser.save_screenshot(str(tmp_path / "visit-after-correction.png"))  # the whole page, for a person to look at
    link = browser.find_element(By.CSS_SELECTOR, 'a.pdf[data-version="2"]')
    assert "reviewed" in link.find_element(By.XPATH, "..").text

    # the PDF behind the link, fetched with the browser's own session
    cookie = browser.get_cookie("dr_review")
    request = urllib.request.Request(link.get_attribute("href"), headers={"Cookie": f"dr_review={cookie['value']}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "application/pdf"
        pdf = resp.read()
    text = " ".join(" ".join((p.extract_text() or "").split()) for p in PdfReader(BytesIO(pdf)).pages)
    assert "Reviewed by Dr A. Grey" in text and f"Grader: {corrected} –" in text and "(corrected)" in text
    assert "Grader: ungradable" in text and "IRMA superotemporal <check>" in text
    with session_scope(worked.factory) as s:
        report = rrepo.exam_reports(s, exam_id)[0]
        assert report.version == 2 and report.review_id == rrepo.current_review(s, exam_id).id
        assert open(report.path, "rb").read() == pdf
    # without the session the PDF is not served: the login page is
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as resp:
        assert "/login?next=" in resp.geturl() and resp.headers["Content-Type"].startswith("text/html")

    # the photo's eye confirmed from the page after checking the label: the folded form opens, sends and says so
    browser.get(f"{base}/visits/{exam_id}")
    wait.until(lambda b: b.execute_script("return document.readyState") == "complete")
    form = browser.find_element(By.CSS_SELECTOR, "#eye-R details.set-eye")
    form.find_element(By.TAG_NAME, "summary").click()
    assert Select(form.find_element(By.NAME, "eye")).first_selected_option.text == "right eye"
    form.find_element(By.NAME, "reason").send_keys("camera worklist")
    form.find_element(By.NAME, "against_photo").click()
    browser.save_screenshot(str(tmp_path / "visit-eye-form.png"))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    flash = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, ".flash")))
    assert "eye confirmed as the right eye" in flash.text and "sign-off no longer covers it" in flash.text
    assert "Awaiting review" in browser.find_element(By.ID, "status").text
    assert "Eye confirmed as the right eye by Dr A. Grey" in browser.find_element(By.ID, "eye-R").text
