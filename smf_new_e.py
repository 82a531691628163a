
TABLE_ROWS = [  # (row name, results folder, the short label of the figure)
    ("Base", "base", "Base"), ("Retrofit (additive)", "retrofit_additive", "Retro add"),
    ("Retrofit (replacement)", "retrofit_replacement", "Retro repl"),
    ("SMF replacement KL", "smf_replacement_kl", "SMF repl KL"),
    ("SMF replacement TF-IDF", "smf_replacement_tfidf", "SMF repl TF-IDF"),
    ("SMF additive KL", "smf_additive_kl", "SMF add KL"),
    ("SMF additive TF-IDF", "smf_additive_tfidf", "SMF add TF-IDF"),
    ("SMF additive +scale KL", "smf_additive_scale_kl", "SMF +scale KL"),
    ("SMF additive +scale TF-IDF", "smf_additive_scale_tfidf", "SMF +scale TF-IDF"),
    ("LoRA", "lora", "LoRA"), ("Full finetuning", "full", "Full FT")]
TABLE_COLUMNS = [  # (header, probe, key of the mean, key of the per-question values or None, scale)
    ("MedMCQA acc", "medmcqa", "acc", "correct", 100), ("MedMCQA gold NLL", "medmcqa", "gold_nll", "gold_nlls", 1),
    ("WikiText ppl", "wikitext", "ppl", None, 1),
    ("TriviaQA alias acc", "triviaqa", "alias_contains_acc", "alias_correct", 100),
    ("TriviaQA EM", "triviaqa", "exact_match", "exact_correct", 100)]

def paired_delta(runs, base, key, scale):
    """(Δ, half-width of its 95% interval) against Base, paired over questions: per question the row's mean
    over seeds minus Base's, then the mean and 1.96 standard errors. None unless all scored the same questions."""
    if len({len(r[key]) for r in runs + base}) != 1 or len(runs[0][key]) < 2:
        return None
    row = [statistics.mean(q) for q in zip(*(r[key] for r in runs))]
    ref = [statistics.mean(q) for q in zip(*(r[key] for r in base))]
    d = [scale * (a - b) for a, b in zip(row, ref)]
    return statistics.mean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))

def table_cells(runs, base, column, is_base):
    """The two cells of one column: mean ± sample std (n) over seeds, and Δ vs Base with its interval."""
    _, _, key, per_question, scale = column
    xs = [scale * r[key] for r in runs]
    if not xs:
        return ["missing", ""], None, None
    cell = f"{statistics.mean(xs):.2f}"
    if len(xs) > 1:
        cell += f" ± {statistics.stdev(xs):.2f}"
    paired = None
    if per_question and base:
        paired = paired_delta(runs, base, per_question, scale)
    if is_base or not base:
        return [f"{cell} (n={len(xs)})", ""], statistics.mean(xs), paired
    delta = f"{statistics.mean(xs) - scale * statistics.mean(r[key] for r in base):+.2f}"
    if paired:
        delta = f"{paired[0]:+.2f} [{paired[0] - paired[1]:+.2f}, {paired[0] + paired[1]:+.2f}]"
    return [f"{cell} (n={len(xs)})", delta], statistics.mean(xs), paired

def run_table(args, device=None):
    """table.md (mean ± sample std over seeds, n per column; unfinished runs reported, not averaged; Δ vs
    Base) and figure.svg, the learning-versus-forgetting plot of the same numbers."""
    found = {}
    for _, folder, _ in TABLE_ROWS:
        files = sorted(glob.glob(os.path.join(args.results_dir, folder, "seed*", "eval.json")))
        found[folder] = [read_json(f, "rerun that stage's evaluation") for f in files]
    require(any(found.values()), f"{args.results_dir} holds no <row>/seed<S>/eval.json — run run_all.sh "
            "first, or point at its OUT folder")
    done = {folder: [r for r in runs if "unfinished" not in r] for folder, runs in found.items()}
    lines = ["| row | " + " | ".join(f"{c[0]} | Δ vs Base" for c in TABLE_COLUMNS) + " |", "|---" * 11 + "|"]
    points = {}  # folder -> {key: (mean, half-width of the paired interval or None)}, for the figure
    for name, folder, _ in TABLE_ROWS:
        cells, points[folder] = [], {}
        for column in TABLE_COLUMNS:
            probe, key = column[1], column[2]
            runs = [r[probe] for r in done[folder] if probe in r]
            base = [r[probe] for r in done["base"] if probe in r]
            two, mean, paired = table_cells(runs, base, column, folder == "base")
            cells += two
            points[folder][key] = (mean, paired[1] if paired else None)
        unfinished = len(found[folder]) - len(done[folder])
        label = f"{name} ({unfinished} unfinished)" if unfinished else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n_seeds = max(len(runs) for runs in done.values())
    questions = {p: len(r[p].get("correct", r[p].get("alias_correct", []))) for runs in done.values()
                 for r in runs for p in ("medmcqa", "triviaqa") if p in r}
    svg = figure_svg(points, n_seeds, questions)
    write_atomic(os.path.join(args.results_dir, "table.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(args.results_dir, "figure.svg"), svg)
    print("\n".join(lines))

# The figure: two panels, y = MedMCQA accuracy; x = WikiText ppl (left), TriviaQA alias accuracy (right).
PANEL_W, PANEL_H, LEFT, TOP, LABEL_W = 330, 300, 70, 40, 130  # pixels: plot box, margins, label column
SMF_START = {"replacement": "retrofit_replacement", "additive": "retrofit_additive"}

def frontier(points, higher_x_is_better):
    """The points no other point beats on both axes at once (y is always higher-better), sorted by x."""
    def beaten(p):
        return any(q != p and q[1] >= p[1] and (q[0] >= p[0] if higher_x_is_better else q[0] <= p[0])
                   for q in points)
    return sorted(p for p in points if not beaten(p))

def scale_axis(values, whiskers, pixels):
    """(lo, hi, to_pixel): a padded data range mapped onto `pixels` (start, end)."""
    lo = min(v - w for v, w in zip(values, whiskers))
    hi = max(v + w for v, w in zip(values, whiskers))
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = lo - pad, hi + pad
    return lo, hi, lambda v: pixels[0] + (v - lo) / (hi - lo) * (pixels[1] - pixels[0])

def panel_svg(x0, rows, x_key, x_title, higher_x_is_better):
    """One panel: axes with ticks, whiskers, the dashed frontier, lines from each retrofit to its SMF rows,
    and labels in a column beside the plot (spaced so they never overlap), each joined to its point."""
    xs = [r[x_key][0] for r in rows]
    ys = [r["acc"][0] for r in rows]
    x_lo, x_hi, px = scale_axis(xs, [r[x_key][1] or 0 for r in rows], (x0, x0 + PANEL_W))
    y_lo, y_hi, py = scale_axis(ys, [r["acc"][1] or 0 for r in rows], (TOP + PANEL_H, TOP))
    out = [f'<g class="panel" data-x="{x_key}" data-x-lo="{x_lo}" data-x-hi="{x_hi}" data-y-lo="{y_lo}" '
           f'data-y-hi="{y_hi}" data-left="{x0}" data-right="{x0 + PANEL_W}" data-top="{TOP}" '
           f'data-bottom="{TOP + PANEL_H}">',
           f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>',
           f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 38}" text-anchor="middle">{x_title}</text>']
    for i in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * (i + 0.5) / 5, y_lo + (y_hi - y_lo) * (i + 0.5) / 5
        out.append(f'<text x="{px(xv):.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle" '
                   f'font-size="11">{xv:.3g}</text>')
        out.append(f'<text x="{x0 - 6}" y="{py(yv) + 4:.1f}" text-anchor="end" font-size="11">{yv:.3g}</text>')
    by_folder = {r["folder"]: r for r in rows}
    for r in rows:  # each SMF row against its own starting point
        start = by_folder.get(SMF_START.get(r["folder"].split("_")[1] if r["folder"].startswith("smf") else ""))
        if start:
            out.append(f'<line class="from-retrofit" x1="{px(start[x_key][0]):.2f}" y1="{py(start["acc"][0]):.2f}" '
                       f'x2="{px(r[x_key][0]):.2f}" y2="{py(r["acc"][0]):.2f}" stroke="#bbb" stroke-dasharray="2 2"/>')
    best = frontier(list(zip(xs, ys)), higher_x_is_better)
    path = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in best)
    out.append(f'<polyline class="frontier" points="{path}" fill="none" stroke="#555" stroke-dasharray="6 4"/>')
    label_y = TOP
    for r in sorted(rows, key=lambda r: -r["acc"][0]):
        x, y = px(r[x_key][0]), py(r["acc"][0])
        if r[x_key][1]:
            w = r[x_key][1] * (px(1) - px(0))
            out.append(f'<line class="whisker-x" data-row="{r["folder"]}" x1="{x - w:.2f}" y1="{y:.2f}" '
                       f'x2="{x + w:.2f}" y2="{y:.2f}" stroke="#333"/>')
        if r["acc"][1]:
            h = r["acc"][1] * (py(0) - py(1))
            out.append(f'<line class="whisker-y" data-row="{r["folder"]}" x1="{x:.2f}" y1="{y - h:.2f}" '
                       f'x2="{x:.2f}" y2="{y + h:.2f}" stroke="#333"/>')
        shape = {"base": "square", "retrofit": "diamond"}.get(r["folder"].split("_")[0], "circle")
        out.append(f'<circle class="point {shape}" data-row="{r["folder"]}" cx="{x:.2f}" cy="{y:.2f}" r="4" '
                   f'fill="{MARKER_FILL[shape]}" stroke="#000"/>')
        label_y = max(label_y, y)
        lx = x0 + PANEL_W + 12
        out.append(f'<line x1="{x:.2f}" y1="{y:.2f}" x2="{lx}" y2="{label_y:.2f}" stroke="#ddd"/>')
        out.append(f'<text class="label" x="{lx + 3}" y="{label_y + 4:.2f}" font-size="11">{r["label"]}</text>')
        label_y += 14  # the next label sits at least a line lower
    out.append("</g>")
    return out

MARKER_FILL = {"square": "#000", "diamond": "#fff", "circle": "#4a7ab5"}

def figure_svg(points, n_seeds, questions):
    """The SVG text: one point per row with results, the mean over its seeds; rows without results, or with a
    non-finite value, are left out and named in the caption."""
    rows, left_out = [], []
    for name, folder, label in TABLE_ROWS:
        values = points[folder]
        keys = ("acc", "ppl", "alias_contains_acc")
        if any(values[k][0] is None for k in keys):
            left_out.append(f"{name} (no results)")
        elif not all(math.isfinite(values[k][0]) for k in keys):
            left_out.append(f"{name} (a value is not finite)")
        else:
            rows.append({"folder": folder, "label": label, **values})
    width, height = 2 * (LEFT + PANEL_W + LABEL_W), TOP + PANEL_H + 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    if len(rows) < 2:
        out.append(f'<text x="20" y="{TOP + 20}">Only {rows[0]["label"] if rows else "no row"} has results: '
                   'nothing to compare yet.</text>')
    else:
        out.append(f'<text x="14" y="{TOP + PANEL_H / 2}" transform="rotate(-90 14 {TOP + PANEL_H / 2})" '
                   'text-anchor="middle">MedMCQA accuracy, % (higher is better)</text>')
        out += panel_svg(LEFT, rows, "ppl", "WikiText perplexity (lower is better)", False)
        out += panel_svg(2 * LEFT + PANEL_W + LABEL_W, rows, "alias_contains_acc",
                         "TriviaQA alias accuracy, % (higher is better)", True)
    caption = (f"Points: mean over {n_seeds} seed(s) on {questions.get('medmcqa', 0)} MedMCQA and "
               f"{questions.get('triviaqa', 0)} TriviaQA questions; whiskers: paired 95% interval of the Δ vs "
               "Base; dashed: the frontier; dotted: each SMF row from its retrofit.")
    if left_out:
        caption += " Left out: " + "; ".join(left_out) + "."
    out.append(f'<text class="caption" x="10" y="{height - 14}" font-size="11">{caption}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"
