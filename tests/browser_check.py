"""Open the built book in headless Chromium and check every page as a reader would see it.

Usage::

    .venv/bin/python tests/browser_check.py _build/html [--screenshots DIR]

For the index and every page in _toc.yml it asserts that the page loads with a title
and a heading; that every image in the article has loaded (``naturalWidth > 0``) from
a non-empty file; that each chapter notebook shows at least as many figures as its
stored outputs hold (and at least one); that no traceback, error or stderr output
appears; and that each chapter's Colab launch link points at the chapter's Colab
edition (``book/colab/<chapter>.ipynb``, see tests/colab_edition.py) in the repository
and branch that _config.yml configures. Math must be typeset: every math node of the page holds MathJax's rendered
output and no raw TeX delimiters remain in the text. Nothing may load from another
host: every script, stylesheet and other resource the page fetched (as the browser's
resource timing lists them) comes from the build itself. It prints one line per page and exits non-zero if any check fails. With
``--screenshots DIR`` it saves a full-page PNG of every page there, for a human look.

Needs a Chromium or Chrome browser and its ``chromedriver`` (found on PATH, or named
by ``$CHROMIUM`` and ``$CHROMEDRIVER``; Debian's ``chromium`` and ``chromium-driver``
packages, for one) and the ``selenium`` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MACOS_BROWSERS = ("/Applications/Chromium.app/Contents/MacOS/Chromium",
                  "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
HOW_TO_GET = ("install Chromium or Chrome and its chromedriver (Debian/Ubuntu: sudo apt-get install chromium "
              "chromium-driver; macOS: brew install --cask chromium chromedriver), or name them with "
              "CHROMIUM=/path/to/browser CHROMEDRIVER=/path/to/chromedriver")


def find_browser() -> tuple:
    """``(browser, chromedriver)`` paths: ``$CHROMIUM``/``$CHROMEDRIVER`` if set, else the first on PATH
    (or in macOS's /Applications); ``None`` for what is not there."""
    browser = os.environ.get("CHROMIUM") or next(
        (shutil.which(n) for n in BROWSER_NAMES if shutil.which(n)), None) or next(
        (p for p in MACOS_BROWSERS if Path(p).exists()), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver
COLAB_PREFIX = "https://colab.research.google.com/github/"
WINDOW = (1400, 1000)  # CSS pixels; screenshots keep this width

# Text that must never appear in a rendered page's outputs.
ERROR_SELECTORS = [
    ".output.stderr",
    ".output.traceback",
    ".output.error",
    ".cell_output .stderr",
    ".cell_output .traceback",
    "div.highlight-ipythontb",
    ".system-message",  # docutils errors rendered into the page
]
ERROR_TEXT = ("Traceback (most recent call last)", "Error in callback", "ModuleNotFoundError")


def colab_url(page: str) -> str:
    """The Colab link a chapter's launch button must carry: the chapter's Colab edition
    (``book/colab/<chapter>.ipynb`` for ``book/<chapter>``) in the repository and branch
    configured in _config.yml."""
    import yaml

    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    owner_repo = urlparse(repo["url"]).path.strip("/")
    book = repo.get("path_to_book", "").strip("/")
    folder, _, name = page.rpartition("/")
    edition = f"{folder}/colab/{name}" if folder else f"colab/{name}"
    return f"{COLAB_PREFIX}{owner_repo}/blob/{repo['branch']}/{book + '/' if book else ''}{edition}.ipynb"


def toc_pages() -> list[str]:
    """Document names (without suffix) in _toc.yml order."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            pages.append(chapter["file"])
            pages += [s["file"] for s in chapter.get("sections", [])]
    return pages


def expected_figures(page: str) -> int | None:
    """Number of PNG outputs stored in the chapter notebook, or None for a non-notebook page."""
    path = ROOT / f"{page}.ipynb"
    if not path.exists():
        return None
    import nbformat

    nb = nbformat.read(path, as_version=4)
    count = 0
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        count += sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    return count


def make_driver(user_data_dir: str, browser: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--allow-file-access-from-files",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(120)
    return driver


def wait_for_images(driver, timeout: float = 30.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete);"
        )
    )


_WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const start = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('ok'), e => done('MathJax failed: ' + e));
  } else if (Date.now() - start > 30000) {
    done('MathJax did not load');
  } else {
    setTimeout(poll, 100);
  }
})();
"""
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "\\begin{", "\\frac", "$$")


def check_math(driver) -> tuple[list[str], int]:
    """Problems with the page's math, and the number of typeset formulas."""
    nodes = driver.execute_script(
        "const m = document.querySelector('main') || document.body;"
        "return m.querySelectorAll('span.math, div.math').length;")
    problems = []
    typeset = 0
    if nodes:
        driver.set_script_timeout(40)
        state = driver.execute_async_script(_WAIT_FOR_MATHJAX)
        if state != "ok":
            return [state], 0
        typeset = driver.execute_script(
            "const m = document.querySelector('main') || document.body;"
            "return Array.from(m.querySelectorAll('span.math, div.math'))"
            ".filter(n => n.querySelector('mjx-container')).length;")
        if typeset < nodes:
            problems.append(f"{nodes - typeset} of {nodes} math elements not typeset by MathJax")
    text = driver.execute_script(
        "const m = (document.querySelector('main') || document.body).cloneNode(true);"
        "m.querySelectorAll('pre, code, script, style, mjx-container, .highlight').forEach(n => n.remove());"
        "return m.textContent;")
    raw = [t for t in RAW_TEX if t in text]
    if raw:
        i = text.find(raw[0])
        problems.append(f"raw TeX in the text ({', '.join(raw)}): {' '.join(text[max(0, i - 40):i + 40].split())!r}")
    return problems, typeset


def check_offline(driver) -> list[str]:
    """Scripts, stylesheets and other resources that did not come from the build."""
    urls = driver.execute_script(
        "const r = performance.getEntriesByType('resource').map(e => e.name);"
        "const s = Array.from(document.querySelectorAll('script[src]')).map(e => e.src);"
        "const l = Array.from(document.querySelectorAll('link[rel~=stylesheet], link[rel=preload], link[rel=modulepreload]'))"
        ".map(e => e.href);"
        "return r.concat(s, l);")
    foreign = sorted({u for u in urls if urlparse(u).scheme not in ("file", "data", "blob", "about", "")})
    return [f"loads from another host: {u}" for u in foreign]


def check_page(driver, html_dir: Path, page: str, is_index: bool = False) -> tuple[list[str], str]:
    """Load one page; return (problems, summary)."""
    problems: list[str] = []
    target = html_dir / ("index.html" if is_index else f"{page}.html")
    if not target.exists():
        return [f"{target} does not exist"], ""
    driver.get(target.resolve().as_uri())
    wait_for_images(driver)
    if is_index:
        # index.html redirects to the root page
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(driver, 15).until(lambda d: d.current_url.endswith(f"{page}.html"))
        except Exception:
            problems.append(f"index.html did not lead to {page}.html (at {driver.current_url})")
        wait_for_images(driver)

    title = driver.title.strip()
    if not title:
        problems.append("empty <title>")
    h1 = driver.execute_script("const h = document.querySelector('article h1, main h1'); return h ? h.innerText : '';")
    if not h1.strip():
        problems.append("no <h1> in the article")

    images = driver.execute_script(
        """
        const root = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
        return Array.from(root.querySelectorAll('img')).map(i => ({
            src: i.currentSrc || i.src, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
        """
    )
    for img in images:
        if not img["complete"] or img["w"] == 0 or img["h"] == 0:
            problems.append(f"image not rendered: {img['src']}")
        url = urlparse(img["src"])
        if url.scheme == "file":
            path = Path(unquote(url.path))
            if not path.exists() or path.stat().st_size == 0:
                problems.append(f"image file missing or empty: {path}")
        elif url.scheme not in ("data",):
            problems.append(f"image not served from the build: {img['src']}")

    expected = expected_figures(page)
    if expected is not None:
        if len(images) < max(expected, 1):
            problems.append(f"{len(images)} images on the page; the notebook stores {expected} figure(s)")

    for selector in ERROR_SELECTORS:
        n = driver.execute_script(f"return document.querySelectorAll({selector!r}).length;")
        if n:
            problems.append(f"{n} element(s) matching {selector}")
    text = driver.execute_script("return (document.querySelector('main') || document.body).textContent;")
    for needle in ERROR_TEXT:
        if needle in text:
            problems.append(f"page text contains {needle!r}")

    math_problems, formulas = check_math(driver)
    problems += math_problems
    problems += check_offline(driver)

    colab = driver.execute_script(
        f"return Array.from(document.querySelectorAll('a[href^=\"{COLAB_PREFIX}\"]')).map(a => a.href);"
    )
    if expected is not None:
        want = colab_url(page)
        if not colab:
            problems.append("no Colab launch link")
        elif not all(href == want for href in colab):
            problems.append(f"Colab link {colab[0]} is not {want}")
    summary = (
        f"title={title[:40]!r} images={len(images)} math={formulas}"
        + (f" (notebook figures {expected})" if expected is not None else "")
        + (f" colab={colab[0].split('/blob/')[-1]}" if colab else "")
    )
    return problems, summary



def screenshot(driver, path: Path) -> None:
    """Full-page PNG: grow the window to the page's height, capture, shrink it back.

    (DevTools' captureBeyondViewport mis-places this theme's centred layout, so the
    window itself is resized instead.)
    """
    height = int(driver.execute_script("return document.documentElement.scrollHeight;"))
    driver.set_window_size(WINDOW[0], max(WINDOW[1], height + 100))
    try:
        wait_for_images(driver)
        path.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.set_window_size(*WINDOW)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", type=Path, nargs="?", help="the built HTML, e.g. _build/html")
    parser.add_argument("--find", action="store_true", help="only say which browser and driver would be used")
    parser.add_argument("--screenshots", type=Path, default=None, help="save a full-page PNG per page here")
    args = parser.parse_args(argv)
    browser, chromedriver = find_browser()
    missing = [name for name, path in (("a Chromium or Chrome browser", browser), ("chromedriver", chromedriver))
               if not path or not Path(path).exists()]
    if missing:
        print(f"FAIL: the browser check needs {' and '.join(missing)}, not found: {HOW_TO_GET}", file=sys.stderr)
        return 2
    if args.find:
        print(f"browser {browser}, driver {chromedriver}")
        return 0
    if args.html_dir is None:
        parser.error("html_dir is required (the built HTML, e.g. _build/html)")
    html_dir = args.html_dir.resolve()
    if not (html_dir / "index.html").exists():
        print(f"FAIL: {html_dir / 'index.html'} does not exist; build the book first", file=sys.stderr)
        return 2
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    pages = toc_pages()
    user_data_dir = tempfile.mkdtemp(prefix="book-browser-check-")
    driver = make_driver(user_data_dir, browser, chromedriver)
    failures = 0
    try:
        for i, (page, is_index) in enumerate([(pages[0], True)] + [(p, False) for p in pages]):
            name = "index.html" if is_index else f"{page}.html"
            try:
                problems, summary = check_page(driver, html_dir, page, is_index)
            except Exception as exc:  # a page that cannot be checked fails, with the reason
                problems, summary = [f"{type(exc).__name__}: {exc}".splitlines()[0]], ""
            if args.screenshots and not problems[:1] == [f"{html_dir / name} does not exist"]:
                shot = args.screenshots / f"{i:02d}_{Path(name).stem}.png"
                try:
                    screenshot(driver, shot)
                    summary += f" screenshot={shot}"
                except Exception as exc:
                    problems.append(f"screenshot failed: {exc}".splitlines()[0])
            status = "ok  " if not problems else "FAIL"
            print(f"{status} {name}: {summary}")
            for p in problems:
                print(f"     - {p}")
            failures += bool(problems)
    finally:
        driver.quit()
        shutil.rmtree(user_data_dir, ignore_errors=True)
    print(f"{len(pages) + 1 - failures} of {len(pages) + 1} pages passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
