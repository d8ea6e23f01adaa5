"""The benchmark's result dict as the table it prints."""

from __future__ import annotations

from .cli_run import startup_line


def format_table(r: dict) -> str:
    a = r["baseline"]
    lines = [f"{'measurement':<34}{'images/s':>9}{'b/a':>7}{'b/c':>7}{'steady':>8}{'b/c':>6}{'peak RSS MB':>13}"
             f"{'agree fp32':>12}{'max |dP|':>10}",
             f"{'(a) plain PyTorch, fp32':<34}{a['images_per_s']:>9.2f}{'':>28}{a['peak_rss_mb']:>13}"
             f"{_pct(a.get('label_agreement')):>12}{_num(a.get('max_prob_diff')):>10}"]
    for mode, c in r["forward"].items():
        lines.append(f"{'(c) bare forward, ' + mode:<34}{c['images_per_s']:>9.2f}")
    for mode, b in r["score"].items():
        lines.append(f"{'(b) cxr-batch score, ' + mode:<34}{b['images_per_s']:>9.2f}{b['b_over_a']:>7.2f}"
                     f"{b['b_over_c']:>7.2f}{_num(b['steady_images_per_s'], 2):>8}{_num(b['b_over_c_steady'], 2):>6}"
                     f"{b['peak_rss_mb']:>13}{_agreement(b):>12}{_num(b['max_prob_diff']):>10}")
    for engine, d in r.get("cli", {}).items():
        lines.append(f"{'(d) score CLI, fp32, ' + engine:<34}{d['images_per_s']:>9.2f}{d['b_over_a']:>7.2f}{'':>21}"
                     f"{d['peak_rss_mb']:>13}{_pct(d.get('label_agreement')):>12}{_num(d.get('max_prob_diff')):>10}")
    for engine, d in r.get("cli", {}).items():
        lines.append(startup_line(engine, d["startup"]))
    if r.get("score_engine") == "local":
        lines.append("(b) ran on the local engine: Ray is not installed here"
                     + (f"; not measured: {', '.join(r['skipped'])}" if r.get("skipped") else ""))
    lines.append(f"fastest mode agreeing with fp32 on >= 99% of labels: {r['fastest_agreeing_mode']}")
    md = r["model"]
    lines.append(f"model: {md['spec']}{' with a calibrated head' if md['calibrated_head'] else ''}, CAM stride"
                 f" {md['cam_stride']} {_network(md)},"
                 f" {md['image_size']} px; P(PNEUMONIA) in [0.2, 0.8] for {_pct(md.get('uncertain_share'))} of the fp32"
                 " run's images (agreement means something from about 20%)")
    m = r["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB; torch {m['torch']}, ray {m['ray'] or 'not installed'};"
                 f" load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end;"
                 f" device {r.get('device', 'cpu')}")
    if a["images"] != r["archive"]["images"]:
        lines.append(f"(a) ran on the first {a['images']} of the {r['archive']['images']} images")
    if "decode_check" in r:
        d = r["decode_check"]
        gpu = d.get("gpu_nvjpeg_images_per_s")
        lines.append(f"decode check ({d['images']} files in memory): PIL draft decode + resize"
                     f" {d['pil_draft_per_core_images_per_s']:.1f} images/s per CPU core"
                     + (f"; nvJPEG on the GPU + resize {gpu:.1f} images/s" if gpu else ""))
    if "train_check" in r:
        t = r["train_check"]
        lines.append(f"(e) training {t['model']} at {t['image_size']} px, batch {t['batch_size']}, {t['images']} images:"
                     f" plain loop ({t['threads']} threads) {t['plain_images_per_s']:.2f} images/s, one `cxr-batch"
                     f" train` worker ({t['worker_cpus']:g} CPUs) {t['worker_images_per_s']:.2f} images/s:"
                     f" worker/plain {t['worker_over_plain']:.2f}")
    if "memory_check" in r:
        m = r["memory_check"]
        lines.append(f"memory check ({m['model']}, {m['side']} px): {m['small']['images']} images peak RSS "
                     f"{m['small']['peak_rss_mb']} MB, {m['large']['images']} images {m['large']['peak_rss_mb']} MB"
                     f" ({m['rss_growth']:+.0%}; private anon {m['anon_growth']:+.0%}; largest process"
                     f" {m['small']['peak_process_mb']} -> {m['large']['peak_process_mb']} MB, {m['process_growth']:+.0%})")
    return "\n".join(lines)


def _agreement(row: dict) -> str:
    return "reference" if row.get("reference") else _pct(row["label_agreement"])


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _network(md: dict) -> str:
    if md.get("cam_layer", 4) == 3:
        return "(ends at layer3, as models trained from ImageNet weights)"
    if md.get("cam_layer", 4) == 2:
        return "(ends at layer2, as models trained from scratch)"
    return "(layer4 dilated)" if md["cam_stride"] == 16 else "(layer4)"
