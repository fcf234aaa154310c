"""The benchmark's tables (`experiments.benchmark`): speed and memory of the fit loop's programs,
EASE Table 5's efficiency layout, and the population engine, given the benchmark's JSON rows."""

from __future__ import annotations


def device_name(env: dict) -> str:
    if env["platform"] == "cpu":
        return f"CPU {env.get('cpu_model') or ''} ({env['host_cpus']} cores)".replace("  ", " ")
    return f"{env['device_kind']} x{env['n_devices']}"


def fmt_mem(row: dict) -> str:
    if row.get("peak_bytes") is None:
        return "n/a"
    return f"{row['peak_bytes'] / 2**30:.2f} GiB ({row['peak_kind']})"


def table(rows: list[dict], env: dict) -> str:
    head = ("| device | model | text encoder | step s | s/epoch | GFLOP/step | GFLOP/s | "
            "compile s | eval compile s | eval samples/s | peak memory (train / with eval) |")
    lines = [head, "|" + "---|" * 11]
    dev = device_name(env)
    for r in rows:
        if r.get("error"):
            lines.append(f"| {dev} | {r['model']} | {r['text_encoder']} | "
                         f"not measured: {r['error']} |" + " |" * 8)
            continue
        gflop = "n/a" if r["step_flops"] is None else f"{r['step_flops'] / 1e9:.0f}"
        rate = "n/a" if r["step_gflops_per_s"] is None else f"{r['step_gflops_per_s']:.1f}"
        lines.append(
            f"| {dev} | {r['model']} | {r['text_encoder']} | {r['step_s_median']:.3f} | "
            f"{r['epoch_s']:.2f} | {gflop} | {rate} | {r['compile_s']:.1f} | "
            f"{r['eval_compile_s']:.1f} | {r['eval_samples_per_s']:.1f} | "
            f"{r['train_peak_bytes'] / 2**30:.2f} / {fmt_mem(r)} |")
    return "\n".join(lines)


# EASE paper Table 5 (MOSI, one GPU): parameters and seconds per training epoch.
PAPER_TABLE5 = (("Self-MM", "122M", 42.6), ("LNLN", "116M", 24.0), ("P-RMF", "117M", 18.0),
                ("EASE", "116M", 7.9))


def efficiency_table(rows: list[dict], env: dict) -> str:
    """Table 5's layout: parameters and seconds per MOSI training epoch (21 steps of 64, no
    evaluation), the paper's rows (their GPU) beside ours (this device). The paper's models
    fine-tune BERT: compare with our BERT rows."""
    lines = ["| model | parameters | s / MOSI epoch | device |", "|---|---|---|---|"]
    lines += [f"| {name} (paper) | {params} | {sec:.1f} | the paper's GPU |"
              for name, params, sec in PAPER_TABLE5]
    for r in rows:
        if r.get("error") or r.get("population") not in (None, 1):
            continue
        lines.append(f"| {r['model'].upper()} ({r['text_encoder']}, ours) | "
                     f"{r['n_params'] / 1e6:.1f}M | {r['epoch_s']:.1f} | {device_name(env)} |")
    return "\n".join(lines)


def population_table(rows: list[dict], env: dict) -> str:
    head = ("| device | model | text encoder | runs | step s | run-samples/s | x one run | "
            "s/epoch (train) | host s/epoch | host % | compile s | peak memory | per run |")
    lines = [head, "|" + "---|" * 13]
    dev = device_name(env)
    single = {(r["model"], r["text_encoder"]): r for r in rows
              if not r.get("error") and r["population"] == 1}
    for r in rows:
        if r.get("error"):
            lines.append(f"| {dev} | {r['model']} | {r['text_encoder']} | {r['population']} | "
                         f"not measured: {r['error']} |" + " |" * 8)
            continue
        one = single.get((r["model"], r["text_encoder"]))
        gain = f"{r['run_samples_per_s'] / one['run_samples_per_s']:.2f}" if one else "n/a"
        per_run = ("n/a" if r["peak_bytes_per_run"] is None
                   else f"{r['peak_bytes_per_run'] / 2**30:.2f} GiB")
        lines.append(
            f"| {dev} | {r['model']} | {r['text_encoder']} | {r['population']} | "
            f"{r['step_s']:.3f} | {r['run_samples_per_s']:.1f} | {gain} | {r['epoch_s']:.1f} | "
            f"{r['host_s']:.2f} | {100 * r['host_fraction']:.2f} | {r['compile_s']:.1f} | "
            f"{fmt_mem(r)} | {per_run} |")
    return "\n".join(lines)
