"""report.html of `retrieval-sdk evaluate`: one self-contained page (no file or network fetched) with the
summary table, and per evaluated file a precision-recall plot and score histograms (matplotlib PNGs as
data URIs), per-class asymmetric/symmetric bars, and ranked result grids of the worst and best queries,
asymmetric beside symmetric, correct hits framed. Each thumbnail is embedded once (a JSON map the page's
one small script puts into the <img> tags), so a grid costs markup, not images.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from sdk.bundle import save_atomic
from sdk.eval_data import Crop, name_label
from sdk.eval_metrics import HIST_BINS, RECALL_LEVELS, SideResult
from sdk.eval_run import EvalRun, FileRun, summary_table
from sdk.preprocess import ImageError, thumbnail_jpeg

THUMB = 96  # thumbnail size (px)
MAX_CLASS_BARS = 60  # more classes: the 30 lowest and 30 highest by asymmetric mAP

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#59636e}
table.summary{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.summary td,table.summary th{padding:3px 8px;border-bottom:1px solid #eaeef2;text-align:right}
table.summary td:nth-child(-n+4),table.summary th:nth-child(-n+4){text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{max-width:100%;border:1px solid #eaeef2}
.bars{display:grid;grid-template-columns:minmax(90px,max-content) 40px 1fr;gap:2px 8px;max-width:760px}
.bar{height:7px;margin:1px 0}.bar.asym{background:#0969da}.bar.sym{background:#bf8700}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.query{display:flex;gap:10px;align-items:flex-start;margin:8px 0;padding-bottom:8px;border-bottom:1px solid #eaeef2}
.lists{display:flex;flex-direction:column;gap:4px}.list{display:flex;gap:4px;align-items:center}
.tag{width:92px;font-size:12px;color:#59636e}
figure{margin:0;text-align:center;font-size:11px;color:#59636e}
figure.q{width:112px;flex:none}figure.q figcaption{overflow-wrap:anywhere}
figure img{width:84px;height:84px;object-fit:cover;display:block;border:3px solid transparent;background:#f6f8fa}
figure.q img{width:96px;height:96px;border-color:#1f2328}
figure.hit.ok img{border-color:#1a7f37}figure.hit.junk img{border-color:#afb8c1;border-style:dashed}
figure.hit.miss img{opacity:.85}
details>summary{cursor:pointer;font-weight:600}
"""

SCRIPT = """
const T = JSON.parse(document.getElementById('thumbs').textContent);
let missing = 0;
for (const img of document.querySelectorAll('img[data-thumb]')) {
  const b64 = T[img.dataset.thumb];
  if (b64) img.src = 'data:image/jpeg;base64,' + b64; else missing++;
}
document.body.dataset.missingThumbs = String(missing);
document.body.dataset.ready = 'true';
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pr_plot(name: str, asym: SideResult, sym: SideResult) -> str:
    """The file's precision-recall curve beside the gallery model's (interpolated, mean over queries)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.add_subplot()
    ax.plot(RECALL_LEVELS, asym.precision, "-o", ms=3, color="#0969da", label=f"asymmetric (mAP {asym.map * 100:.1f})")
    ax.plot(RECALL_LEVELS, sym.precision, "-s", ms=3, color="#bf8700", label=f"symmetric (mAP {sym.map * 100:.1f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="interpolated precision", title=f"precision-recall: {name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def histogram_plot(name: str, asym: SideResult, sym: SideResult) -> str:
    """Cosine scores of positive vs negative query-gallery pairs, asymmetric and symmetric."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.0))
    centres, width = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2, HIST_BINS[1] - HIST_BINS[0]
    for i, (title, r) in enumerate((("asymmetric: " + name, asym), ("symmetric: gallery model", sym))):
        ax = fig.add_subplot(1, 2, i + 1)
        for counts, colour, what in ((r.hist_neg, "#cf222e", "negative"), (r.hist_pos, "#1a7f37", "positive")):
            total = counts.sum()
            density = counts / (total * width) if total else counts.astype(float)
            ax.fill_between(centres, density, step="mid", alpha=0.35, color=colour)
            ax.step(centres, density, where="mid", color=colour, label=f"{what} pairs ({total})")
        ax.set(xlabel="cosine score", ylabel="density", title=title, xlim=(-1, 1))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


class _Thumbs:
    """Thumbnails by key ('q3', 'g12'), each image read and encoded once."""

    def __init__(self, run: EvalRun):
        self.run, self.data = run, {}
        self.loo = run.data.leave_one_out

    def key(self, side: str, i: int) -> str:
        side = "g" if self.loo else side
        key = f"{side}{i}"
        if key not in self.data:
            src = (self.run.data.gallery if side == "g" else self.run.data.queries).sources[i]
            try:
                jpeg = thumbnail_jpeg(src.open() if isinstance(src, Crop) else src, THUMB)
                self.data[key] = base64.b64encode(jpeg).decode()
            except ImageError:
                self.data[key] = ""
        return key


def class_bars(run: EvalRun, f: FileRun) -> str:
    """Per class, mean AP of the file (asymmetric) and of the gallery model (symmetric) as bars."""
    q = run.data.queries  # revisited: a query's AP is grouped under the landmark its image name gives
    classes = q.labels if run.data.gnd is None else np.asarray([name_label(n) for n in q.names])
    rows = []
    for c in np.unique(classes):
        sel = (classes == c) & ~np.isnan(f.result.aps)
        if sel.any():
            rows.append((c, int(sel.sum()), float(f.result.aps[sel].mean()), float(np.nanmean(run.symmetric.aps[sel]))))
    rows.sort(key=lambda r: (r[2], r[0]))
    note = ""
    if len(rows) > MAX_CLASS_BARS:
        note = f"<p class='meta'>{len(rows)} classes: the {MAX_CLASS_BARS // 2} lowest and highest by asymmetric mAP</p>"
        rows = rows[:MAX_CLASS_BARS // 2] + rows[-MAX_CLASS_BARS // 2:]
    cells = [f"<div class='cls' data-class='{_esc(c)}'>{_esc(c)}</div><div class='meta'>{n}</div>"
             f"<div><div class='bar asym' style='width:{a * 100:.1f}%' title='asymmetric mAP {a * 100:.2f}'>"
             f"</div><div class='bar sym' style='width:{s * 100:.1f}%' title='symmetric mAP {s * 100:.2f}'>"
             "</div></div>" for c, n, a, s in rows]
    legend = ("<p class='legend meta'><span style='background:#0969da'></span>asymmetric"
              "<span style='background:#bf8700'></span>symmetric (mean AP per class; queries per class)</p>")
    return f"{note}{legend}<div class='bars'>{''.join(cells)}</div>"


def _hit_class(run: EvalRun, q: int, g: int) -> str:
    if run.data.gnd is None:
        return "ok" if run.data.gallery.labels[g] == run.data.queries.labels[q] else "miss"
    gq = run.data.gnd.gnd[q]
    if g in gq.easy or g in gq.hard:
        return "ok"
    return "junk" if g in gq.junk else "miss"


def _result_list(run: EvalRun, thumbs: _Thumbs, q: int, r: SideResult, tag: str, which: str) -> str:
    figs = [f"<figure class='hit {_hit_class(run, q, g)}' data-id='{_esc(run.data.gallery.names[g])}'>"
            f"<img data-thumb='{thumbs.key('g', g)}' alt='{_esc(run.data.gallery.names[g])}'>"
            f"<figcaption>{s:.3f}</figcaption></figure>" for g, s in zip(r.top_ids[q].tolist(), r.top_scores[q])]
    return f"<div class='list {which}'><span class='tag'>{tag}<br>AP {r.aps[q] * 100:.1f}</span>{''.join(figs)}</div>"


def grids(run: EvalRun, f: FileRun, thumbs: _Thumbs) -> str:
    """The worst and best queries by the file's asymmetric AP, each with both ranked lists."""
    aps = f.result.aps
    order = [int(i) for i in np.argsort(aps, kind="stable") if not np.isnan(aps[i])]
    n = run.config.grid_queries
    worst = order[:min(n, (len(order) + 1) // 2)]
    best = order[len(worst):][-n:][::-1]
    out = []
    for title, kind, queries in (("worst", "worst", worst), ("best", "best", best)):
        rows = []
        for q in queries:
            name = run.data.queries.names[q]
            label = run.data.queries.labels[q]
            rows.append(f"<div class='query' data-query='{_esc(name)}' data-ap-asym='{aps[q]:.4f}' "
                        f"data-ap-sym='{run.symmetric.aps[q]:.4f}'>"
                        f"<figure class='q'><img data-thumb='{thumbs.key('q', q)}' alt='{_esc(name)}'>"
                        f"<figcaption>{_esc(name)}<br>{_esc(label)}</figcaption></figure><div class='lists'>"
                        + _result_list(run, thumbs, q, f.result, "asymmetric", "asym")
                        + _result_list(run, thumbs, q, run.symmetric, "symmetric", "sym") + "</div></div>")
        out.append(f"<h3>The {len(queries)} {title} queries (asymmetric AP)</h3>"
                   f"<div class='grid {kind}'>{''.join(rows)}</div>")
    return "".join(out)


def _file_section(run: EvalRun, f: FileRun, thumbs: _Thumbs, i: int) -> str:
    ratio = f.result.map / run.symmetric.map
    head = (f"<h2 id='file-{i}'>{_esc(f.path)} <span class='meta'>({f.role} model, {f.format} {f.precision})</span></h2>"
            f"<p>asymmetric mAP {f.result.map * 100:.2f} vs symmetric {run.symmetric.map * 100:.2f}: "
            f"asym/sym {ratio:.3f}; {f.images_per_s:.1f} images/s</p>")
    plots = (f"<div class='plots'><img class='plot pr' alt='precision-recall plot of {_esc(f.path)}' "
             f"src='{pr_plot(f.path, f.result, run.symmetric)}'>"
             f"<img class='plot hist' alt='score histograms of {_esc(f.path)}' "
             f"src='{histogram_plot(f.path, f.result, run.symmetric)}'></div>")
    return (f"<section class='file' data-file='{_esc(f.path)}'>{head}{plots}<h3>Per class</h3>"
            f"<div class='classes'>{class_bars(run, f)}</div>{grids(run, f, thumbs)}</section>")


def render(run: EvalRun) -> str:
    """The whole page as one string."""
    d, cfg = run.data, run.config
    header, rows = summary_table(run)
    table = ("<table class='summary'><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>"
             "<tbody>" + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
             + "</tbody></table>")
    shown = [f for f in run.files if not f.reference] or run.files
    thumbs = _Thumbs(run)
    sections = "".join(_file_section(run, f, thumbs, i) for i, f in enumerate(shown))
    what = (f"{len(d.queries)} queries, {len(d.gallery)} gallery images"
            + (f", {len(np.unique(d.gallery.labels))} classes" if d.gnd is None else f", gnd {_esc(d.gnd.name)}"))
    skipped = "".join(f"<li>{_esc(p)}: {_esc(r)}</li>" for p, r in run.skipped)
    unreadable = "".join(f"<li>{_esc(n)}: {_esc(r)}</li>" for n, r in run.unreadable)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>retrieval-sdk evaluate: {_esc(cfg.bundle)}</title><style>{CSS}</style></head>
<body>
<h1>retrieval-sdk evaluate</h1>
<p class="meta">bundle {_esc(cfg.bundle)} · space {_esc(run.space)} · {_esc(d.protocol)} on {_esc(cfg.images)}
 · {what} · gallery embedded by {_esc(run.gallery_file)} · faiss {_esc(cfg.index)}, lists of {run.top_k}
 · {len(run.unreadable)} unreadable images skipped · {run.seconds:.0f} s</p>
<h2>Summary</h2>{table}
{f"<details><summary>{len(run.skipped)} files not evaluated here</summary><ul>{skipped}</ul></details>" if skipped else ""}
{f"<details><summary>{len(run.unreadable)} unreadable images</summary><ul>{unreadable}</ul></details>" if unreadable else ""}
{sections}
<script id="thumbs" type="application/json">{json.dumps(thumbs.data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(run: EvalRun, path: Path) -> Path:
    return save_atomic(render(run), path)
