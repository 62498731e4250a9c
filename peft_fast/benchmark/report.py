"""Turn benchmark results into a table, a JSON file, a PNG plot, a regression table and bench/RESULTS.md."""

from __future__ import annotations

import json
import os
from typing import Optional

GIB = 1024**3


def _ms(v: Optional[float]) -> str:
    return "—" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _mem(v: Optional[int]) -> str:
    if v is None:
        return "—"
    return f"{v / GIB:.2f}G" if v >= GIB / 4 else f"{v / 2**20:.1f}M"


def _impl(case: dict, name: str) -> Optional[dict]:
    return case["impls"].get(name)


def ratio(case: dict, name: str, over: str = "base") -> Optional[float]:
    """time(name) / time(over), or None when either is missing or `name` gave a wrong result."""
    a, b = _impl(case, name), _impl(case, over)
    if not a or not b or a.get("ok") is False or b.get("ok") is False:
        return None
    if a.get("median_ms") is None or b.get("median_ms") is None:
        return None
    return a["median_ms"] / b["median_ms"]


def _cell(case: dict, name: str, value: Optional[float], fmt: str = "{:.2f}×") -> str:
    impl = _impl(case, name)
    if impl and impl.get("ok") is False:
        return "WRONG" if not impl.get("error") else "ERROR"
    return "—" if value is None else fmt.format(value)


def _kept(case: dict, name: str) -> str:
    impl = _impl(case, name)
    if not impl or impl.get("saved_bytes") is None or not case.get("out_bytes"):
        return "—"
    return f"{impl['saved_bytes'] / case['out_bytes']:.2f}"


def _timed(case: dict, name: str) -> str:
    """Median wall ms, with the GPU kernel time of one step in brackets when it was measured."""
    impl = _impl(case, name) or {}
    wall, kernel = impl.get("median_ms"), impl.get("kernel_ms")
    return _ms(wall) if kernel is None or wall is None else f"{_ms(wall)} ({_ms(kernel)})"


def table(cases: list[dict]) -> str:
    """Markdown table: per case the three medians (GPU kernel time of one step in brackets: far below the wall time
    means the host is the bottleneck), the ratios to the bare base, the speed-up over PEFT, memory."""
    head = ("| case | base ms (GPU) | PEFT ms (GPU) | peft_fast ms (GPU) | PEFT/base | peft_fast/base | "
            "speed-up vs PEFT | peak PEFT | peak peft_fast | kept B/out B PEFT | kept B/out B peft_fast |")
    lines = [head, "|" + "---|" * 11]
    for c in cases:
        speedup = ratio(c, "peft", "peft_fast")
        row = [
            c["id"], _timed(c, "base"), _timed(c, "peft"), _timed(c, "peft_fast"),
            _cell(c, "peft", ratio(c, "peft")), _cell(c, "peft_fast", ratio(c, "peft_fast")),
            _cell(c, "peft_fast", speedup), _mem((_impl(c, "peft") or {}).get("peak_bytes")),
            _mem((_impl(c, "peft_fast") or {}).get("peak_bytes")), _kept(c, "peft"), _kept(c, "peft_fast"),
        ]
        lines.append("| " + " | ".join(row) + " |")
        for extra in [n for n in c["impls"] if n not in ("base", "peft", "peft_fast")]:
            impl = c["impls"][extra]
            lines.append(f"| ↳ {extra} | | | {_timed(c, extra)} | | {_cell(c, extra, ratio(c, extra))} | "
                         f"{_cell(c, extra, ratio(c, 'peft', extra))} | | {_mem(impl.get('peak_bytes'))} | | |")
    return "\n".join(lines)


def _rate(v: float) -> str:
    """Tokens per second for the throughput lines: 69.0k, 1234, 48.2 (a decode rate of 48 tok/s read "0.0k")."""
    return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def throughput_lines(cases: list[dict]) -> list[str]:
    out = []
    for c in cases:
        rates = {n: i.get("units_per_s") for n, i in c["impls"].items() if i.get("units_per_s")}
        if rates:
            parts = ", ".join(f"{n} {_rate(v)} tok/s" for n, v in rates.items())
            fits = {n: i["fits"] for n, i in c["impls"].items() if i.get("fits")}
            if fits:  # whether a step ran under each memory budget (GiB)
                parts += "; " + ", ".join(
                    f"{n} " + " ".join(f"{gib} GiB {'fits' if ok else 'does not fit'}" for gib, ok in f.items())
                    for n, f in fits.items())
            out.append(f"- {c['id']}: {parts}")
    return out


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def plot(path: str, cases: list[dict], title: str) -> None:
    """Bar chart of time / bare-base time per case for HF PEFT, peft_fast and every other timed variant of a case
    (compiled, merged, forced Triton …); 1.0 = the bare base, lower is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["peft", "peft_fast"]  # each implementation one colour, in the order the cases list them
    for c in cases:
        names += [n for n in c["impls"] if n != "base" and n not in names]
    label = {"peft": "HF PEFT"}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(min(20.0, max(6.0, 0.9 * len(cases) + 2)), 5.0))
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, c in enumerate(cases):
            value = ratio(c, name) if name in c["impls"] else None
            if value is not None:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=label.get(name, name))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["id"] for c in cases], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("time / bare base (lower is better)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(current: list[dict], previous: list[dict], threshold: float = 0.10) -> tuple[str, list[str]]:
    """Regression table of peft_fast's median against an earlier run; a case regresses when it got slower by more
    than `threshold` or its result became wrong. Returns (markdown, ids of regressed cases)."""
    before = {c["id"]: c for c in previous}
    lines = ["| case | before ms | now ms | change | status |", "|---|---|---|---|---|"]
    regressed = []
    for c in current:
        old = before.get(c["id"])
        now_impl = _impl(c, "peft_fast") or {}
        if old is None:
            lines.append(f"| {c['id']} | — | {_ms(now_impl.get('median_ms'))} | — | new |")
            continue
        old_impl = _impl(old, "peft_fast") or {}
        a, b = old_impl.get("median_ms"), now_impl.get("median_ms")
        if now_impl.get("ok") is False:
            status, change = "REGRESSION (wrong result)", "—"
            regressed.append(c["id"])
        elif a is None or b is None:
            status, change = "not comparable", "—"
        else:
            delta = b / a - 1.0
            change = f"{delta:+.1%}"
            status = "REGRESSION" if delta > threshold else ("faster" if delta < -threshold else "same")
            if delta > threshold:
                regressed.append(c["id"])
        lines.append(f"| {c['id']} | {_ms(a)} | {_ms(b)} | {change} | {status} |")
    return "\n".join(lines), regressed


def _settings_text(settings: dict) -> str:
    rows = settings.get("one_gemm_min_rows")
    parts = [f"fused kernels {settings.get('cuda_kernels')}",
             f"one-GEMM route from {rows} rows" if rows is not None else "one-GEMM route off"]
    if rows is not None and "one_gemm_max_rank" in settings:
        parts.append(f"up to rank {settings['one_gemm_max_rank']}")
    produce = settings.get("one_gemm_produce_min_rows")
    if rows is not None and "one_gemm_produce_min_rows" in settings:
        parts.append(f"its GEMMs make the low-rank product from {produce} rows" if produce is not None else
                     "its GEMMs read the shrink's low-rank product")
    parts += [f"{key}={value}" for key, value in settings.get("env", {}).items()]
    return ", ".join(parts)


def results_markdown(payload: dict, plot_name: str) -> str:
    env = payload["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "triton", "transformers", "peft", "peft_fast")
                         if env.get(k))
    body = [
        "# peft_fast benchmark results",
        "",
        "Regenerated by `peft-fast bench --write-results`; the raw samples are in `results.json` beside this file.",
        "",
        f"Device: **{env['device_name']}** ({env['device']}), dtype {env['dtype']}, {versions}.",
        *([f"Settings: {_settings_text(env['settings'])}."] if env.get("settings") else []),
        f"Suite `{payload['suite']}`{' (quick)' if payload.get('quick') else ''}, run {payload['date']}"
        f"{', commit ' + payload['commit'] if payload.get('commit') else ''}.",
        *([payload["note"], ""] if payload.get("note") else []),
        "",
        "Times are medians after warm-up (CUDA events on a GPU); in brackets the GPU kernel time of one step "
        "(torch.profiler), so a host-bound row shows. Ratios are time / bare base layer or model; speed-up is PEFT "
        "time / peft_fast time. `fwd` cases time a no-grad forward in train mode; kept B/out B is the activation "
        "bytes saved for backward per output byte.",
        "",
        table(payload["cases"]),
        "",
        *throughput_lines(payload["cases"]),
        "",
        f"![ratios]({plot_name})",
        "",
    ]
    return "\n".join(body)


def write_results(directory: str, payload: dict, plot_src: str) -> str:
    os.makedirs(directory, exist_ok=True)
    plot_name = "results.png"
    with open(plot_src, "rb") as src, open(os.path.join(directory, plot_name), "wb") as dst:
        dst.write(src.read())
    write_json(os.path.join(directory, "results.json"), payload)
    path = os.path.join(directory, "RESULTS.md")
    with open(path, "w") as f:
        f.write(results_markdown(payload, plot_name))
    return path
