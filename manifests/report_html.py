"""The dataset report's page: the plots (PNG, matplotlib's Agg backend) and the
self-contained ``index.html`` that embeds them, rendered from the report dict that
:func:`speechmill.manifests.dataset_report.compute_report` returns."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

SPLIT_ORDER = ("train", "dev", "test")
#: groups listed in report.json per key; the full table of a larger key goes to
#: ``hours_by_<key>.parquet`` (a crawl can have millions of speakers)
JSON_GROUP_LIMIT = 1000


def _col_name(k: str) -> str:
    return "source_url" if k == "source" else k


def _figure(w: float = 7.0, h: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _hist_plot(ax: Any, h: dict[str, Any], color: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.stairs(h["counts"], h["edges"], fill=True, color=color, alpha=0.85)
    ax.set_xlabel(h["label"])
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if h.get("mean") is not None:
        ax.axvline(h["mean"], color="black", linestyle="--", linewidth=1,
                   label=f"mean {h['mean']:.2f}")
        ax.legend(loc="upper right", fontsize=8)


def _bar_plot(path: Path, items: list[tuple[str, float]], xlabel: str, title: str,
              color: str) -> None:
    fig = _figure(7.0, max(2.0, 0.8 + 0.28 * len(items)))
    ax = fig.add_subplot()
    labels = [_short(k) for k, _ in items][::-1]
    ax.barh(range(len(items)), [v for _, v in items][::-1], color=color)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _ranked(d: dict[str, dict[str, Any]], top_n: int) -> list[tuple[str, dict[str, Any]]]:
    return sorted(d.items(), key=lambda kv: (-kv[1]["seconds"], kv[0]))[:top_n]


def _split_key(k: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(k) if k in SPLIT_ORDER else len(SPLIT_ORDER), k)


def write_plots(rep: dict[str, Any], out_dir: Path, top_n: int) -> dict[str, str]:
    """PNG files for the report's sections that have data; name -> file name."""
    plots: dict[str, str] = {}
    hist = rep["histograms"]
    for name, color in (("duration_s", "#4c72b0"), ("dnsmos_ovrl", "#55a868")):
        if hist.get(name):
            fig = _figure()
            ax = fig.add_subplot()
            _hist_plot(ax, hist[name], color)
            ax.set_title(f"{hist[name]['label']}: {hist[name]['count']} rows", fontsize=10)
            _save(fig, out_dir / f"{name}.png")
            plots[name] = f"{name}.png"
    rates = [n for n in ("chars_per_s", "words_per_s") if hist.get(n)]
    if rates:
        fig = _figure(7.0 if len(rates) == 1 else 10.0)
        for i, n in enumerate(rates, 1):
            ax = fig.add_subplot(1, len(rates), i)
            _hist_plot(ax, hist[n], "#c44e52")
        _save(fig, out_dir / "speaking_rate.png")
        plots["speaking_rate"] = "speaking_rate.png"
    for key, color in (("language", "#8172b2"), ("speaker", "#4c72b0"),
                       ("source", "#937860"), ("split", "#55a868")):
        d = rep["hours_by"].get(key)
        if not d:
            continue
        items = (sorted(d.items(), key=lambda kv: _split_key(kv[0])) if key == "split"
                 else _ranked(d, top_n))
        title = f"hours by {key}" + (f" (top {len(items)} of {len(d)})"
                                     if len(items) < len(d) else "")
        name = "top_speakers" if key == "speaker" else f"hours_by_{key}"
        if key == "speaker":
            title = f"top {len(items)} speakers of {len(d)} by hours"
        _bar_plot(out_dir / f"{name}.png", [(k, a["hours"]) for k, a in items], "hours",
                  title, color)
        plots[name] = f"{name}.png"
    rj = _reject_rows(rep)
    if rj:
        from matplotlib.ticker import MaxNLocator

        fig = _figure(10.0, max(2.0, 0.8 + 0.28 * len(rj)))
        labels = [_short(f"{s}: {r}") for s, r, _ in rj][::-1]
        for i, (what, color) in enumerate((("rows", "#c44e52"), ("hours", "#dd8452")), 1):
            ax = fig.add_subplot(1, 2, i)
            ax.barh(range(len(rj)), [a[what] for _, _, a in rj][::-1], color=color)
            ax.set_yticks(range(len(rj)), labels if i == 1 else [""] * len(rj), fontsize=8)
            ax.set_xlabel(what)
            if what == "rows":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"rejects ({what})", fontsize=10)
        _save(fig, out_dir / "rejects.png")
        plots["rejects"] = "rejects.png"
    return plots


def _reject_rows(rep: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    order = {s["stage"]: i for i, s in enumerate(rep["stages"])}
    out = []
    for sid, st in rep["rejects"]["by_stage"].items():
        for reason, a in st["by_reason"].items():
            out.append((sid, reason, a))
    out.sort(key=lambda x: (order.get(x[0], len(order)), x[0], -x[2]["rows"], x[1]))
    return out


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}.nodata{color:#888;font-style:italic}
.notes{background:#fff7e0;border:1px solid #f0d890;padding:.5em 1em;margin:1em 0}
.sub{color:#666}img{max-width:100%;display:block;margin:.5em 0}
.grid{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
"""


def escape(x: Any) -> str:
    return html.escape("-" if x is None else str(x))


def _num(x: Any, fmt: str = "{:,}") -> str:
    if x is None:
        return "-"
    return fmt.format(x)


def _hours_str(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:,.3f}" if h >= 0.01 else f"{h:.6f}"


def _table(head: list[str], rows: list[list[Any]], numeric: set[int]) -> str:
    th = "".join(f'<th{" class=n" if i in numeric else ""}>{escape(h)}</th>'
                 for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>'
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(out_dir: Path, plots: dict[str, str], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    data = base64.b64encode((out_dir / plots[name]).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _nodata(why: str = "") -> str:
    return f'<p class="nodata">no data{f" ({escape(why)})" if why else ""}</p>'


def render_html(rep: dict[str, Any], out_dir: Path, plots: dict[str, str], top_n: int) -> str:
    run, ds, tot = rep["run"], rep["dataset"], rep["totals"]
    h: list[str] = []
    title = f"speechmill dataset report: {run.get('name') or Path(run['run_dir']).name}"
    h.append(f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}"
             f"</title><style>{_CSS}</style></head><body>")
    h.append(f"<h1>{escape(title)}</h1>")
    h.append(f'<p class="sub">run directory <code>{escape(run["run_dir"])}</code> &middot; status '
             f"<b>{escape(run['status'])}</b> (attempt {escape(run.get('attempt'))}, started "
             f"{escape(run.get('started_at'))}, ended {escape(run.get('ended_at'))}) &middot; "
             f"dataset: stage <b>{escape(ds['stage'])}</b> ({ds['parts']} part files)</p>")
    if rep["notes"]:
        h.append('<div class="notes"><b>Notes:</b><ul>'
                 + "".join(f"<li>{escape(n)}</li>" for n in rep["notes"]) + "</ul></div>")

    h.append("<h2>Totals</h2>")
    if ds["stage"] is None or not tot["rows"]:
        h.append(_nodata("no dataset rows"))
    else:
        h.append(_table(["rows", "hours", "mean duration (s)", "languages", "speakers",
                         "sources", "splits", "rows without duration"],
                        [[_num(tot["rows"]), _hours_str(tot["hours"]),
                          _num(tot["mean_duration_s"], "{:.2f}"), _num(tot["languages"]),
                          _num(tot["speakers"]), _num(tot["sources"]), _num(tot["splits"]),
                          _num(tot["rows_without_duration"])]], set(range(8))))

    for key, label in (("language", "language"), ("split", "split"), ("source", "source")):
        d = rep["hours_by"].get(key)
        h.append(f"<h2>Hours by {label}</h2>")
        if not d:
            h.append(_nodata(f"no {_col_name(key)} column" if ds["stage"] and d is None
                             else "no rows"))
            continue
        items = (sorted(d.items(), key=lambda kv: _split_key(kv[0])) if key == "split"
                 else _ranked(d, top_n))
        total_s = sum(a["seconds"] for a in d.values()) or 0.0
        rows = [[escape(k), _num(a["rows"]), _hours_str(a["hours"]),
                 _num(100 * a["seconds"] / total_s if total_s else None, "{:.1f}%")]
                for k, a in items]
        where = (f"hours_by_{key}.parquet" if len(d) > JSON_GROUP_LIMIT else "report.json")
        more = (f'<p class="sub">top {len(items)} of {len(d)} by hours; all of them are in '
                f"{where}</p>" if len(items) < len(d) else "")
        h.append('<div class="grid"><div>' + _table([label, "rows", "hours", "share"], rows,
                                                    {1, 2, 3}) + more + "</div><div>"
                 + _img(out_dir, plots, f"hours_by_{key}", f"hours by {label}")
                 + "</div></div>")

    h.append("<h2>Top speakers</h2>")
    if rep["top_speakers"]:
        h.append(_table(["#", "speaker", "rows", "hours", "share", "mean duration (s)"],
                        [[i, escape(s["speaker"]), _num(s["rows"]), _hours_str(s["hours"]),
                          _num(None if s["share"] is None else 100 * s["share"], "{:.1f}%"),
                          _num(s["mean_duration_s"], "{:.2f}")]
                         for i, s in enumerate(rep["top_speakers"], 1)], {0, 2, 3, 4, 5}))
        n_spk = rep["totals"]["speakers"] or 0
        if n_spk > len(rep["top_speakers"]):
            where = ("hours_by_speaker.parquet" if n_spk > JSON_GROUP_LIMIT
                     else "report.json (hours_by.speaker)")
            h.append(f'<p class="sub">top {len(rep["top_speakers"])} of {n_spk:,} speakers by '
                     f"hours; all of them are in {where}</p>")
        h.append(_img(out_dir, plots, "top_speakers", "top speakers by hours"))
    else:
        h.append(_nodata("no speaker column" if ds["stage"] else "no rows"))

    h.append("<h2>Distributions</h2>")
    hist = rep["histograms"]
    sections = [("duration_s", "Duration", ["duration_s"]),
                ("dnsmos_ovrl", "DNSMOS OVRL", ["dnsmos_ovrl"]),
                ("speaking_rate", "Speaking rate", ["chars_per_s", "words_per_s"])]
    for plot, label, names in sections:
        h.append(f"<h3>{escape(label)}</h3>")
        present = [n for n in names if hist.get(n)]
        if not present:
            h.append(_nodata(f"no {' or '.join(names)} values"))
            continue
        h.append(_table(["", "rows with a value", "missing", "min", "mean", "max"],
                        [[escape(hist[n]["label"]), _num(hist[n]["count"]),
                          _num(hist[n]["missing"]), _num(hist[n]["min"], "{:.3f}"),
                          _num(hist[n]["mean"], "{:.3f}"), _num(hist[n]["max"], "{:.3f}")]
                         for n in present], {1, 2, 3, 4, 5}))
        h.append(_img(out_dir, plots, plot, label))

    h.append("<h2>Rejects by stage and reason</h2>")
    rj = _reject_rows(rep)
    if rj:
        rt = rep["rejects"]
        h.append(f'<p class="sub">{rt["rows"]:,} rows rejected, {_hours_str(rt["hours"])} h '
                 f"({rt['rows_without_duration']:,} without a known duration)</p>")
        h.append(_table(["stage", "reason", "rows", "hours"],
                        [[escape(s), escape(r), _num(a["rows"]), _hours_str(a["hours"])]
                         for s, r, a in rj], {2, 3}))
        h.append(_img(out_dir, plots, "rejects", "rejects by stage and reason"))
    else:
        h.append(_nodata("no rejected rows"))

    h.append("<h2>Stages</h2>")
    if rep["stages"]:
        h.append(_table(["stage", "uses", "state", "rows out", "rows rejected", "hours out"],
                        [[escape(s["stage"]), escape(s["uses"]), escape(s["state"]), _num(s["rows_out"]),
                          _num(s["rows_rejected"]), _hours_str(s["audio_hours_out"])]
                         for s in rep["stages"]], {3, 4, 5}))
    else:
        h.append(_nodata("no stages"))
    h.append('<p class="sub">Hours are audio hours of the dataset stage\'s rows; the '
             "numbers are in report.json next to this page.</p></body></html>\n")
    return "\n".join(h)
