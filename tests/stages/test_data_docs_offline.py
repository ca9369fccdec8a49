"""Stage test: the validate stage's Data Docs render on an air-gapped machine.

great-expectations builds its pages with bootstrap, jQuery, bootstrap-table and font-awesome
from public CDNs; the index's validation table is filled in by bootstrap-table's JavaScript, so
without those scripts it is empty. ``validate.run`` on real prepared splits must leave pages whose
every script, stylesheet, font and image is a file inside the report, and a headless Chromium with
all host names unresolvable and a proxy that goes nowhere must show one row per suite in the index.

Needs Debian's ``chromium`` (or ``chromium-browser`` / ``google-chrome``) on PATH for the browser
test; it is skipped with the reason when none is found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from _prepare_data import project_params, write_raw

from pipeline_tasks.dataset import prepare, validate

SUITES = ("train", "val", "test", "cross_split", "schema")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# every way a page pulls in a resource: script/img src, stylesheet/icon href, CSS url(...)
RESOURCE = re.compile(
    r"<(?:script|img)\b[^>]*?\bsrc=[\"']([^\"']+)[\"']"
    r"|<link\b[^>]*?\bhref=[\"']([^\"']+)[\"']"
    r"|url\(\s*[\"']?([^\"')]+)[\"']?\s*\)",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def data_docs(corpora, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_docs")
    raw = write_raw(corpora, root)
    prepare.run(project_params(root, raw))
    assert validate.run(project_params(root, raw))["success"]
    return root / "reports" / "validate" / "data_docs"


def resources(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [next(g for g in match.groups() if g) for match in RESOURCE.finditer(text)]


def test_data_docs_pages_load_every_asset_from_the_report(data_docs):
    pages = sorted(data_docs.rglob("*.html"))
    assert len(pages) >= 2 * len(SUITES) + 1  # index, one suite page and one validation page each
    remote, missing = [], []
    for page in pages:
        for ref in resources(page):
            if ref.startswith("data:"):
                continue
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith("//"):
                remote.append(f"{page.relative_to(data_docs)}: {ref}")
            elif not (page.parent / unquote(parts.path)).is_file():
                missing.append(f"{page.relative_to(data_docs)}: {ref}")
    assert remote == [], f"{len(remote)} assets still load from the network, e.g. {remote[:5]}"
    assert missing == [], f"{len(missing)} local asset links point at no file, e.g. {missing[:5]}"
    for stylesheet in data_docs.rglob("*.css"):  # font-awesome's fonts, relative to its stylesheet
        for ref in resources(stylesheet):
            if ref.startswith("data:"):
                continue
            assert not urlsplit(ref).scheme, f"{stylesheet}: {ref}"
            # the .ttf sources are fallbacks after .woff2, which every current browser reads: not shipped
            if not ref.endswith(".ttf"):
                assert (stylesheet.parent / urlsplit(ref).path).is_file(), f"{stylesheet}: {ref} missing"


def _browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)}): `apt-get install chromium`")


def test_data_docs_index_lists_validation_results_in_offline_chromium(data_docs, tmp_path):
    browser = _browser()
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            # the network is off: no host name resolves and every request goes to a closed port
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            "--dump-dom",
            (data_docs / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    dom = proc.stdout
    assert proc.returncode == 0 and "</html>" in dom, proc.stderr[-3000:]
    # bootstrap-table renders each validation result as a clickable row linking to its page; the
    # raw HTML holds the same data only as a JavaScript literal, never as such a row
    links = re.findall(r'<tr[^>]*\bdata-href="(validations/[^"]+)"', dom)
    assert sorted(link.split("/")[1] for link in links) == sorted(SUITES), (
        f"the index lists {len(links)} validation results offline (expected one per suite {SUITES}); "
        f"browser stderr: {proc.stderr[-1500:]}"
    )
    for link in links:
        assert (data_docs / link).is_file()
