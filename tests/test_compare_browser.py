"""The HTML report in a real browser: headless Chromium (Debian's `chromium` package) renders it, every
plot loads (decoded, non-zero size), the tables read (a header row, body rows of the same width) and
nothing errors in the console. Slow (a browser start per page); skipped where Chromium is not installed.

The page is opened with a probe script put in front of the report's own content: it records every error
(script errors, resources that fail to load, console.error) and, after the load event, writes what it
found into the DOM, which `chromium --headless --dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from peftbench.compare import load_study, write_report
from tests.test_compare import write_study

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's package (apt-get install -y chromium) to run this"
)

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target || {};
  window.__errors.push(t.tagName ? ("failed to load " + t.tagName) : String(e.message));
}, true);
var __consoleError = console.error;
console.error = function () { window.__errors.push("console.error: " + Array.from(arguments).join(" "));
  __consoleError.apply(console, arguments); };
window.addEventListener("load", function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}; });
  var tables = Array.from(document.querySelectorAll("table")).map(function (t) {
    var head = t.querySelectorAll("thead th").length;
    var rows = Array.from(t.querySelectorAll("tbody tr")).map(function (r) { return r.cells.length; });
    return {head: head, rows: rows, text: t.innerText.length}; });
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: window.__errors, images: imgs, tables: tables,
    svgs: document.querySelectorAll("svg").length, h2: Array.from(document.querySelectorAll("h2")).map(
      function (h) { return h.textContent; }), bodyText: document.body.innerText.length});
  document.body.appendChild(out);
});
</script>"""


def probe(page: Path, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Open `page` (with the probe in front) in headless Chromium; the probe's findings and its stderr."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not finish loading: {done.stdout[-500:]} {done.stderr[-1000:]}"
    text = (
        found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
    return json.loads(text), done.stderr


def console_errors(stderr: str) -> list[str]:
    """Console messages at error level that Chromium logged (`CONSOLE` lines with `ERROR` or Uncaught)."""
    return [
        line for line in stderr.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
    ]


@pytest.fixture
def report(tmp_path: Path) -> Path:
    records, summary = load_study(write_study(tmp_path / "t"))
    return write_report(records, summary, tmp_path / "out")["html"]


@needs_chromium
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    found, stderr = probe(report, tmp_path)
    assert found["errors"] == [] and console_errors(stderr) == []
    assert found["h2"][:2] == ["Claims", "Budget"] and "Environment" in found["h2"]
    images = found["images"]
    assert len(images) == 4  # learning curves and the three Pareto plots
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in images), images
    tables = found["tables"]
    assert len(tables) >= 4  # headline, claims, all metrics, failed runs
    for table in tables:
        assert table["head"] > 0 and table["rows"] and table["text"] > 0
        assert set(table["rows"]) == {table["head"]}, table  # every row as wide as the header
    assert found["bodyText"] > 1000


@needs_chromium
def test_probe_sees_a_broken_plot(report: Path, tmp_path: Path) -> None:
    """The check can fail: a plot whose data is not an image is reported."""
    page = report.read_text()
    broken = report.with_name("broken.html")
    broken.write_text(
        re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]{100}", "data:image/png;base64,AAAA", page, count=1)
    )
    found, _ = probe(broken, tmp_path)
    assert "failed to load IMG" in found["errors"]
    assert sum(1 for i in found["images"] if i["width"] == 0) == 1
