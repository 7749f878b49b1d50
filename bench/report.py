"""The suite's figures as a console table, a markdown snippet for the README, and pass/fail targets."""

from __future__ import annotations

from typing import Any

COLUMNS = ("run", "rows fetched", "rows done", "wall s", "fetching s", "commit tail s", "rows/s", "CPU own s", "CPU git s", "CPU sim s", "CPU pg s", "CPU machine s",
           "peak RSS MB", "requests")


def _runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    s = results["scenarios"]
    out = []
    if "lifted" in s:
        out.append(("lifted", s["lifted"]))
    if "memory" in s:
        out += [("memory small", s["memory"]["small"]), ("memory large", s["memory"]["large"])]
    if "polite" in s:
        out.append(("polite", s["polite"]))
    if "workers" in s:
        out += [("workers 1", s["workers"]["n1"]), ("workers 2", s["workers"]["n2"]),
                ("3 workers, capped", s["workers"]["three_workers_capped"])]
    if "scrapy" in s:
        counts: dict[str, int] = {}
        for r in s["scrapy"]["runs"]:
            counts[r["tool"]] = counts.get(r["tool"], 0) + 1
            out.append((f"{'A' if r['tool'] == 'crawler' else 'B'}{counts[r['tool']]} {r['tool']}", r))
    return out


def _cells(label: str, r: dict[str, Any]) -> list[str]:
    stopped = " (deadline)" if r.get("stopped_at_deadline") else ""
    def secs(key: str) -> str:
        return f"{r[key]:.1f}" if r.get(key) is not None else "-"
    return [label + stopped, f"{r['attempted']:,}", f"{r['done']:,}", f"{r['wall_s']:.1f}", secs("fetch_phase_s"), secs("commit_tail_s"),
            f"{r['rows_per_s']:,.0f}",
            f"{r['cpu_crawler_s']:.1f}", f"{r['cpu_children_s']:.1f}", f"{r['cpu_simulator_s']:.1f}",
            f"{r['cpu_postgres_s']:.1f}" if "cpu_postgres_s" in r else "-",
            f"{r['cpu_machine_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['requests_at_simulator']:,}"]


def _parts(m: dict[str, Any]) -> str:
    """Who held what at each size's peak: `; at the peak, job/commit worker/object reader/git MB`."""
    said = []
    for size in ("small", "large"):
        parts = m[size].get("tree_parts_at_peak_mb") or {}
        if parts:
            said.append(" + ".join(f"{k} {v:.0f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    return f"; at the peaks: {' | '.join(said)}" if said else ""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    out = []
    if "lifted" in s:
        rate = s["lifted"]["rows_per_s"]
        out.append({"name": "lifted throughput", "target": ">= 1,500 rows/s", "measured": f"{rate:,.0f} rows/s",
                    "met": rate >= 1500 and not s["lifted"]["stopped_at_deadline"]})
    if "memory" in s:
        m = s["memory"]
        out.append({"name": "flat memory", "target": "peak RSS large <= 1.2 x small",
                    "measured": f"{m['large']['peak_rss_mb']:.0f} / {m['small']['peak_rss_mb']:.0f} MB "
                                f"= {m['rss_ratio']:.2f} x ({m['large']['attempted']:,} vs {m['small']['attempted']:,} rows fetched)",
                    "met": m["rss_ratio"] <= 1.2 and not m["large"]["stopped_at_deadline"]})
        out.append({"name": "flat memory, children included", "target": "peak RSS of the job and its children, large <= 1.2 x small",
                    "measured": f"{m['large']['peak_tree_rss_mb']:.0f} / {m['small']['peak_tree_rss_mb']:.0f} MB "
                                f"= {m['tree_rss_ratio']:.2f} x ({m['large']['attempted']:,} vs {m['small']['attempted']:,} rows fetched)"
                                + _parts(m),
                    "met": m["tree_rss_ratio"] <= 1.2 and not m["large"]["stopped_at_deadline"]})
    if "polite" in s:
        p = s["polite"]
        out.append({"name": "polite makespan", "target": "makespan / physical minimum <= 1.02",
                    "measured": f"{p['wall_s']:.1f} / {p['physical_minimum_s']:.1f} s = {p['makespan_ratio']:.3f}",
                    "met": p["makespan_ratio"] <= 1.02})
        # How close the server saw two starts of one budget, in units of its spacing (1/rate).
        closest = min(b["min_start_gap_s"] * b["rate_per_s"] for b in p["budgets"].values())
        out.append({"name": "polite budgets kept", "target": "starts per 1 s <= rate, open <= max_inflight",
                    "measured": f"{'kept' if p['polite'] else 'BROKEN'}; closest starts {closest:.4f} x 1/rate apart",
                    "met": p["polite"]})
    if "workers" in s:
        w = s["workers"]
        # More than the noise between two runs of one process (about 5 % here) counts as growth.
        out.append({"name": "workers: more rows/s with 2", "target": "rows/s with --workers 2 > with 1, by 5 % or more",
                    "measured": f"{w['n2']['rows_per_s']:,.0f} / {w['n1']['rows_per_s']:,.0f} rows/s = {w['speedup']:.2f} x",
                    "met": (w["speedup"] or 0) >= 1.05})
        three = w["three_workers_capped"]
        out.append({"name": "workers: no double requests, caps kept", "target": "0 repeated; starts per 1 s <= rate, open <= max_inflight",
                    "measured": f"{three['repeated_requests']} repeated; caps {'kept' if three['caps_held'] else 'BROKEN'}",
                    "met": three["repeated_requests"] == 0 and three["caps_held"]})
        if "machine" in s:
            bare = s["machine"]["bare"]
            bare_ms = 1000 * bare["cpu_s"] / max(bare["rows"], 1)
            cpu = w["n1"]["cpu_ms_per_row"]
            job_ms = cpu["job"]
            # Where it goes: the kernel's share (a file created per row, sockets, thread hand-offs),
            # the event loop's thread alone, and what creating one file costs the kernel here.
            split = (f"; of it kernel {cpu.get('job_system', 0):.2f} ms, event loop thread "
                     f"{cpu.get('job_event_loop_thread', 0):.2f} ms; one file created: "
                     f"{s['machine']['file_kernel_us'] / 1000:.2f} ms of kernel CPU")
            storing = s["machine"].get("bare_storing")
            if storing:  # the floor: the bare client that also hashes and writes each body to its file
                floor_ms = 1000 * storing["cpu_s"] / max(storing["rows"], 1)
                split += (f"; the bare client storing the bodies (hash, file, rename; no database, log or "
                          f"commit) {floor_ms:.2f} ms = {floor_ms / bare_ms:.2f} x bare, the job "
                          f"{job_ms / floor_ms:.2f} x that")
            out.append({"name": "job CPU per row", "target": "<= 2 x the bare client's",
                        "measured": f"{job_ms:.2f} / {bare_ms:.2f} ms = {job_ms / bare_ms:.2f} x" + split,
                        "met": job_ms <= 2 * bare_ms})
    return out


def table(results: dict[str, Any]) -> str:
    rows = [list(COLUMNS)] + [_cells(label, r) for label, r in _runs(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", *notes(results), ""]
    lines += [f"{'MET ' if t['met'] else 'MISS'}  {t['name']}: {t['measured']} (target {t['target']})"
              for t in results["targets"]]
    return "\n".join(lines)


def notes(results: dict[str, Any]) -> list[str]:
    st = results["settings"]
    s = results["scenarios"]
    out = [f"machine: {results['machine']['cores']} cores, Python {results['machine']['python']}; "
           f"mode: {results['mode']}; artifacts.fsync = {str(st['fsync']).lower()}",
           f"lifted: {st['lifted_hosts']} hosts, max_inflight {st['inflight_per_host']} each, rate_per_s "
           f"{st['lifted_rate_per_s']:,.0f}, rate_guard_s 0, ~{st['image_bytes'] // 1000} KB PNGs, HEAD then GET each",
           "rows fetched: outcomes the job reached; rows done: outcomes in the database (a fetched row once "
           "committed and stamped); wall and rows/s (rows done / wall): "
           "spawn to exit; fetching: run start to the last row's outcome; commit tail: from there to the last commit",
           "CPU own: the measured process; CPU git: its children (git); CPU pg: the PostgreSQL server; "
           "CPU machine: all cores, everything included"]
    if "machine" in s:
        m = s["machine"]
        out.append(f"machine ceilings: a bare aiohttp HEAD+GET loop (no database, files, hashing or commits) against "
                   f"the same simulator does {m['bare']['rows_per_s']:,.0f} rows/s here (client CPU "
                   f"{m['bare']['cpu_s']:.1f} s, simulator CPU {m['bare']['cpu_simulator_s']:.1f} s for "
                   f"{m['bare']['rows']:,} rows); creating one 10 KB file (write, rename) costs {m['file_us']} us "
                   f"({m['file_kernel_us']} us of kernel CPU), so files alone hold one core to "
                   f"{1e6 / max(m['file_us'], 1):,.0f} rows/s")
    if "memory" in s and s["memory"]["large"].get("rss_curve"):
        curve = s["memory"]["large"]["rss_curve"]
        picks = curve[:: max(1, len(curve) // 6)]
        if picks[-1] is not curve[-1]:
            picks.append(curve[-1])
        out.append("memory large, RSS as the rows went by (rows fetched: RSS / peak / peak with children MB): "
                   + ", ".join(f"{int(p[0]):,}: {p[1]:.0f} / {p[2]:.0f} / {p[3] if len(p) > 3 else 0:.0f}"
                               for p in picks))
    if "workers" in s:
        for n in (1, 2):
            run = s["workers"][f"n{n}"]
            c = run["cpu_ms_per_row"]
            # Cores busy: what the whole machine spent over the run's wall time, against its cores.
            out.append(f"workers {n}: CPU ms per row: job {c['job']}, commit worker and git {c['commit_worker_and_git']}, "
                       f"PostgreSQL {c['postgres']}, simulator {c['simulator']}, machine {c['machine']}; "
                       f"cores busy {run['cpu_machine_s'] / max(run['wall_s'], 1e-9):.2f} of {results['machine']['cores']}")
    if "polite" in s:
        p = s["polite"]
        out.append(f"polite: shipped budgets, {st['polite_latency_ms']:.0f} ms server latency; minimum = max over "
                   "budgets of requests counted at the simulator / rate_per_s; "
                   f"run (no interpreter start) {p['run_duration_s']:.1f} s = {p['run_ratio']:.3f}, "
                   f"first request to last response {p['simulator_span_s']:.1f} s = {p['simulator_span_ratio']:.3f}")
    if "scrapy" in s:
        sc = s["scrapy"]
        ratio = f"{sc['ratio']:.2f}" if sc["ratio"] else "n/a"
        out.append(f"scrapy: same rows, hosts and per-host in-flight cap, HEAD then GET, body to a file + sha256 "
                   f"({'a disk flush every 100 files, as the crawler flushes once per commit' if st['fsync'] else 'no disk flush'}); "
                   f"Scrapy does no database, journal or git commits. Median rows/s crawler {sc['crawler_rows_per_s']:,.0f}"
                   f" vs Scrapy {sc['scrapy_rows_per_s']:,.0f}: crawler/Scrapy = {ratio}")
    return out


def markdown(results: dict[str, Any]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    body = ["| " + " | ".join(_cells(label, r)) + " |" for label, r in _runs(results)]
    goals = ["| target | measured | met |", "|---|---|---|"]
    goals += [f"| {t['name']}: {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
              for t in results["targets"]]
    return "\n".join(["### Benchmark (`make bench`)", "", head, rule, *body, "", *goals, "",
                      *[f"- {n}" for n in notes(results)], ""])
