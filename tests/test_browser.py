"""The routing and ablation notebooks, run in a real JupyterLab in headless Chromium (Debian's package).

Starts JupyterLab on 127.0.0.1 with throw-away config/settings/workspace/checkpoint dirs (autosave off: the
notebooks on disk are never written), runs every cell from the browser, checks that each widget and plotly
output really rendered (no "Error displaying widget"), moves the routing explorer's layer slider and ticks an
ablation checkbox and checks that the plots changed, and saves screenshots to $GROKVIZ_SCREENSHOTS (default:
<tmp>/grokviz-screenshots). CI installs chromium through scripts/test.sh; elsewhere the test skips without it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("GROKVIZ_SCREENSHOTS") or Path(tempfile.gettempdir()) / "grokviz-screenshots")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ERROR_TEXTS = ["Error displaying widget", "Loading widget...", "Failed to create view",
               "Click to show javascript error"]
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False,
                                                    "doNotDisturbMode": True},
}

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM}: apt-get install chromium fonts-dejavu-core "
                              "(scripts/test.sh does this as root on Debian)"),
]

KERNEL_IDLE = """() => { const w = window.jupyterapp?.shell?.currentWidget;
  const k = w?.sessionContext?.session?.kernel;
  return !!(w?.context?.isReady && k && k.status === 'idle' && k.connectionStatus === 'connected'); }"""
RUN_ALL = """() => { const app = window.jupyterapp; window.__gvPanel = app.shell.currentWidget;
  window.__gvRun = null;
  app.commands.execute('notebook:run-all-cells').then(r => { window.__gvRun = {ok: r !== false}; },
                                                     e => { window.__gvRun = {ok: false, error: String(e)}; });
  return true; }"""
CELLS = """([WMIME, PMIME, markers]) => window.__gvPanel.content.widgets.map((cell, i) => {
  const m = cell.model; if (m.type !== 'code') return null;
  const outs = m.outputs.toJSON();
  const text = cell.node.querySelector('.jp-Cell-outputWrapper')?.innerText || '';
  return {i, count: m.executionCount,
    errors: outs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
    want_widgets: outs.filter(o => o.data && o.data[WMIME] && o.data[WMIME].model_id).length,
    want_plotly: outs.filter(o => o.data && o.data[PMIME] && !o.data[WMIME]).length,
    widgets: cell.node.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets').length,
    placeholders: cell.node.querySelectorAll(
      '.jp-OutputArea-output.jupyter-widgets, .jupyter-widgets-error-widget').length,
    mime_plots: [...cell.node.querySelectorAll('.jp-RenderedPlotly')].filter(g => g.querySelector('.main-svg')).length,
    plots: [...cell.node.querySelectorAll('.js-plotly-plot')].filter(g => g.querySelector('.main-svg')).length,
    markers: markers.filter(t => text.includes(t))}; }).filter(c => c)"""
SIGNATURE = """(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot')].map(g =>
  JSON.stringify((g.data || []).map(t => [t.x, t.y, t.z])) + (g.querySelector('.gtitle')?.textContent || ''))
  .join('|')"""
# Every plot inside the views drawn *with its data*: plotly's data has points and the SVG has drawn traces
# (heatmap images, bars, markers/lines, sankey nodes), and no plot sticks out of its notebook output (clipping).
PLOTS_DRAWN = """(sel) => { const plots = [...document.querySelectorAll(sel + ' .js-plotly-plot')];
  const size = v => v == null ? 0 : (v.bdata !== undefined || v.dtype !== undefined) ? 1 : (v.length ?? 1);
  const gaps = t => Array.isArray(t.z) && t.z.every(r => Array.isArray(r) ? r.every(v => v == null) : r == null);
  return plots.length > 0 && plots.every(g => (g.data || []).length > 0
    && g.data.every(t => t.type === 'sankey' ? size(t.node?.label) > 0 : size(t.z) + size(t.y) > 0)
    && (g.data.every(gaps)   /* e.g. "routing changed" with nothing changed: all gaps, nothing to paint */
        || g.querySelectorAll('.heatmaplayer image, .barlayer .point, .scatterlayer .trace path, .sankey-node')
             .length > 0)); }"""
CLIPPED = """(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot')].filter(g => {
  const out = g.closest('.jp-OutputArea-output').getBoundingClientRect(), r = g.getBoundingClientRect();
  return r.right > out.right + 1; }).map(g => g.querySelector('.gtitle')?.textContent || '?')"""
PLOT_STATE = """(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot')].map(g =>
  (g.querySelector('.gtitle')?.textContent || '(no title)') + ': ' + (g.data || []).map(t => t.type).join('+'))"""
TITLES = """() => [...document.querySelectorAll('.jp-Notebook .js-plotly-plot .gtitle')].map(e => e.textContent)"""


def _wait_drawn(page, view, timeout, when=""):
    """Wait until every plot of ``view`` shows its data (see PLOTS_DRAWN); on time-out say what each plot holds."""
    try:
        _wait(page, PLOTS_DRAWN, timeout, f"the plots of {view} to be drawn with their data{when}", view)
    except AssertionError as e:
        errors = [m for m in getattr(page, "gv_console", []) if not m.startswith("warning")][-8:]
        raise AssertionError(f"{e}; plots: {page.evaluate(PLOT_STATE, view)}; console: {errors}") from None


def _wait(page, predicate, timeout, what, arg=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            raise AssertionError(f"dialog while waiting for {what}: {dialog.first.inner_text()[:300]}")
        value = page.evaluate(predicate, arg) if arg is not None else page.evaluate(predicate)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Lab:
    """A JupyterLab server on 127.0.0.1 with throw-away state; stop() ends it and any kernel it left, by PID."""

    def __init__(self, work: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token, self.work = secrets.token_hex(16), work
        self.base = f"http://127.0.0.1:{self.port}"
        for plugin, values in SETTINGS.items():
            pkg, name = plugin.rsplit("/", 1)
            (work / "settings" / pkg).mkdir(parents=True, exist_ok=True)
            (work / "settings" / pkg / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(work / "runtime"), JUPYTER_CONFIG_DIR=str(work / "config"),
                   PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={ROOT / 'notebooks'}", "--ServerApp.terminals_enabled=False",
               "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={work / 'settings'}",
               f"--LabApp.workspaces_dir={work / 'workspaces'}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", f"--FileCheckpoints.checkpoint_dir={work / 'checkpoints'}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(work / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.children: set[int] = set()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(work / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                self.api("GET", "/api/status")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def api(self, method, path):
        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read()

    def note_children(self):
        import psutil
        try:
            self.children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def stop(self):
        self.note_children()
        try:
            self.api("POST", "/api/shutdown")
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.children:  # kernels run in their own sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("lab")
    lab = Lab(work)
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(work / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=ARGS,
                                                        viewport={"width": 1500, "height": 1100})
            try:
                pg = ctx.pages[0] if ctx.pages else ctx.new_page()
                pg.set_default_timeout(60_000)
                pg.gv_console = []     # browser console errors and page errors, reported when a wait times out
                pg.on("console", lambda m: m.type in ("error", "warning") and pg.gv_console.append(
                    f"{m.type}: {m.text[:300]}"))
                pg.on("pageerror", lambda e: pg.gv_console.append(f"pageerror: {str(e)[:300]}"))
                pg.gv_lab = lab
                yield pg
            finally:
                ctx.close()
    finally:
        lab.stop()


def open_and_run(page, name: str, timeout: float = 240) -> list[dict]:
    """Open notebooks/<name> in Lab, run all cells from the browser, wait until every output rendered."""
    lab = page.gv_lab
    page.goto(f"{lab.base}/lab/tree/{name}?token={lab.token}", wait_until="domcontentloaded")
    _wait(page, f"() => window.jupyterapp?.shell?.currentWidget?.context?.path === {json.dumps(name)}", 120,
          f"{name} to open")
    _wait(page, KERNEL_IDLE, 120, "the kernel")
    lab.note_children()
    page.evaluate(RUN_ALL)
    result = _wait(page, "() => window.__gvRun", timeout, "run all cells")
    _wait(page, KERNEL_IDLE, 60, "the kernel after the run")
    deadline, last, since = time.monotonic() + 90, None, time.monotonic()
    while True:   # every widget / plotly output drawn, and the DOM stable for 1 s
        cells = page.evaluate(CELLS, ["application/vnd.jupyter.widget-view+json",
                                      "application/vnd.plotly.v1+json", ERROR_TEXTS])
        sig = json.dumps(cells)
        if sig != last:
            last, since = sig, time.monotonic()
        done = all(c["widgets"] >= c["want_widgets"] and c["mime_plots"] >= c["want_plotly"]
                   and "Loading widget..." not in c["markers"] for c in cells)
        if (done and time.monotonic() - since > 1.0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    errors = [f"cell {c['i']}: {e}" for c in cells for e in c["errors"]]
    assert result.get("ok") and not errors, f"{name}: run failed: {result} {errors}"
    for c in cells:
        assert c["count"] is not None, f"{name}: cell {c['i']} did not run"
        assert c["widgets"] >= c["want_widgets"], f"{name}: cell {c['i']}: widget not rendered {c}"
        assert c["mime_plots"] >= c["want_plotly"], f"{name}: cell {c['i']}: plotly output not rendered {c}"
        assert not c["placeholders"] and not c["markers"], f"{name}: cell {c['i']}: widget error {c}"
    return cells


def shoot(page, locator, path: Path) -> None:
    """Element screenshot; grows the viewport first when the element is taller than it (Lab scrolls inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vp = page.viewport_size
    h = locator.evaluate("e => Math.ceil(e.getBoundingClientRect().height)")
    if h + 250 > vp["height"]:
        page.set_viewport_size({"width": vp["width"], "height": min(h + 300, 6000)})
        page.wait_for_timeout(500)
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    page.set_viewport_size(vp)


def test_routing_notebook_renders_and_layer_slider_updates_plot(page):
    cells = open_and_run(page, "01_exploring_routing.ipynb")
    assert sum(c["plots"] for c in cells) >= 8 and sum(c["widgets"] for c in cells) >= 3
    for view in (".gv-routing-explorer", ".gv-load-dashboard", ".gv-routing-flow"):
        _wait_drawn(page, view, 60)
        assert not page.evaluate(CLIPPED, view), f"{view}: plots wider than the notebook column"
    explorer = page.locator(".gv-routing-explorer").first
    shoot(page, explorer, SHOTS / "01_routing_explorer.png")
    shoot(page, page.locator(".gv-load-dashboard").first, SHOTS / "01_load_dashboard.png")
    shoot(page, page.locator(".gv-routing-flow").first, SHOTS / "01_routing_flow.png")
    before = page.evaluate(SIGNATURE, ".gv-routing-explorer")
    assert "Layer 0: tokens coloured by selected expert (row 0 = first choice)" in page.evaluate(TITLES)
    handle = explorer.locator(".gv-layer-slider .noUi-handle")
    handle.focus()
    page.keyboard.press("ArrowRight")
    _wait(page, "() => [...document.querySelectorAll('.gv-routing-explorer .js-plotly-plot .gtitle')]"
                ".some(e => e.textContent.startsWith('Layer 1: tokens'))", 30, "the strip title to show layer 1")
    _wait(page, f"(sel) => ({SIGNATURE})(sel) !== {json.dumps(before)}", 30, "the plot data to change",
          ".gv-routing-explorer")
    _wait_drawn(page, ".gv-routing-explorer", 30, " after the move")
    assert handle.get_attribute("aria-valuenow").startswith("1")
    shoot(page, explorer, SHOTS / "01_routing_explorer_layer1.png")


def test_ablation_notebook_renders_and_checkbox_updates_plot(page):
    cells = open_and_run(page, "03_ablation_experiments.ipynb")
    assert sum(c["plots"] for c in cells) >= 3
    lab = page.locator(".gv-ablation-lab").first
    _wait_drawn(page, ".gv-ablation-lab", 60)
    assert not page.evaluate(CLIPPED, ".gv-ablation-lab"), "ablation lab plots wider than the notebook column"
    shoot(page, lab, SHOTS / "03_ablation_lab.png")
    before = page.evaluate(SIGNATURE, ".gv-ablation-lab")
    summary = lab.locator(".gv-ablation-summary")
    assert summary.inner_text().startswith("ablated (route_around): nothing")
    box = lab.locator(".gv-ablation-checkbox input[type=checkbox]").first
    box.click()
    _wait(page, "() => document.querySelector('.gv-ablation-lab .gv-ablation-summary')?.innerText.includes('L0 E0')",
          30, "the summary to list L0 E0")
    _wait(page, "() => document.querySelector('.gv-ablation-lab .gv-ablation-experts input')?.value === '0'", 30,
          "the expert field to follow the checkbox")
    _wait(page, f"(sel) => ({SIGNATURE})(sel) !== {json.dumps(before)}", 30, "the ablation plots to change",
          ".gv-ablation-lab")
    assert box.is_checked()
    _wait_drawn(page, ".gv-ablation-lab", 30, " after the change")
    shoot(page, lab, SHOTS / "03_ablation_lab_L0E0.png")
    field = lab.locator(".gv-ablation-experts input")                  # the same lab driven by its text field
    field.fill("0-1")
    field.press("Enter")
    _wait(page, "() => document.querySelector('.gv-ablation-lab .gv-ablation-summary')?.innerText.includes('L0 E0-1')",
          30, "the summary to list L0 E0-1")
    _wait(page, "() => document.querySelectorAll('.gv-ablation-lab .gv-ablation-checkbox input:checked').length === 2",
          30, "the checkboxes to follow the expert field")
    _wait_drawn(page, ".gv-ablation-lab", 30, " after typing")
    page.screenshot(path=str(SHOTS / "03_window.png"))


def test_generation_notebook_renders_and_removal_updates_comparison(page):
    cells = open_and_run(page, "06_generation.ipynb")
    assert sum(c["widgets"] for c in cells) >= 2
    view = ".gv-generation-explorer"
    _wait_drawn(page, view, 60)
    assert not page.evaluate(CLIPPED, view), "generation explorer plots wider than the notebook column"
    explorer = page.locator(view).first
    shoot(page, explorer, SHOTS / "06_generation_explorer.png")
    first_titles = f"() => [...document.querySelector('{view}').querySelectorAll('.js-plotly-plot .gtitle')]"
    assert page.evaluate(first_titles + ".some(e => e.textContent.startsWith('Layer 0: prompt'))")
    before = page.evaluate(SIGNATURE, view)
    handle = explorer.locator(".gv-gen-layer .noUi-handle")
    handle.focus()
    page.keyboard.press("ArrowRight")
    _wait(page, first_titles + ".some(e => e.textContent.startsWith('Layer 1: prompt'))", 30,
          "the strip title to show layer 1")
    _wait(page, f"(sel) => ({SIGNATURE})(sel) !== {json.dumps(before)}", 30, "the plot data to change", view)
    field = explorer.locator(".gv-gen-remove input")                   # regenerate with expert 0 out at layer 1
    field.fill("0")
    field.press("Enter")
    _wait(page, first_titles + ".some(e => e.textContent.startsWith('Continuations with') && "
                               "e.textContent.includes('L1 E0'))", 90, "the comparison to show L1 E0 removed")
    _wait(page, f"() => document.querySelector('{view} .gv-gen-compare')?.innerText.includes('L1 E0 removed')", 30,
          "the side-by-side text to name the removal")
    _wait_drawn(page, view, 30, " after the removal")
    shoot(page, explorer, SHOTS / "06_generation_explorer_removed.png")


ADD_CELL = """(src) => { const app = window.jupyterapp, nb = app.shell.currentWidget.content;
  nb.activeCellIndex = nb.widgets.length - 1; window.__gvCell = null;
  app.commands.execute('notebook:insert-cell-below').then(() => {
    nb.activeCell.model.sharedModel.setSource(src);
    return app.commands.execute('notebook:run-cell'); })
  .then(r => { window.__gvCell = {ok: r !== false}; }, e => { window.__gvCell = {ok: false, error: String(e)}; });
  return true; }"""
HEAT_TITLE = """(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot .gtitle')].map(e => e.textContent)
  .find(t => t.startsWith('Expert load share per layer')) || ''"""


def test_load_dashboard_prefill_decode_toggle(page):
    """The load dashboard on notebook 06's GenerationResult, in a cell added to that notebook's live session (no
    new notebook, no new compile; autosave is off, so the file is untouched): the tokens toggle redraws it."""
    current = page.evaluate("() => window.jupyterapp?.shell?.currentWidget?.context?.path")
    if current != "06_generation.ipynb":
        open_and_run(page, "06_generation.ipynb")
    page.evaluate(ADD_CELL, "from grokviz import viz\nviz.ExpertLoadDashboard(result)")
    result = _wait(page, "() => window.__gvCell", 60, "the added cell to run")
    assert result.get("ok"), f"the added cell failed: {result}"
    view = ".gv-load-dashboard"
    _wait(page, f"() => !!document.querySelector('{view} .gv-load-phase')", 60, "the dashboard with its toggle")
    _wait_drawn(page, view, 60)
    assert not page.evaluate(CLIPPED, view), "load dashboard plots wider than the notebook column"
    titles = f"() => [...document.querySelectorAll('{view} .js-plotly-plot .gtitle')].map(e => e.textContent)"
    assert any(t.startswith("Layer 0 expert load: prefill vs decode") for t in page.evaluate(titles))
    assert "tokens)" in page.evaluate(HEAT_TITLE, view)
    dashboard = page.locator(view).first
    shoot(page, dashboard, SHOTS / "06_load_dashboard_both.png")
    before = page.evaluate(SIGNATURE, view)
    dashboard.locator(".gv-load-phase button", has_text="decode").click()
    _wait(page, f"(sel) => ({HEAT_TITLE})(sel).includes('generated tokens')", 30,
          "the heatmap to show the generated tokens", view)
    _wait(page, f"(sel) => ({SIGNATURE})(sel) !== {json.dumps(before)}", 30, "the plot data to change", view)
    _wait_drawn(page, view, 30, " after the toggle")
    shoot(page, dashboard, SHOTS / "06_load_dashboard_decode.png")
    dashboard.locator(".gv-load-phase button", has_text="prefill").click()
    _wait(page, f"(sel) => ({HEAT_TITLE})(sel).includes('prompt tokens')", 30,
          "the heatmap to show the prompt tokens", view)
    _wait_drawn(page, view, 30, " after the second toggle")
