"""The human summaries the commands print at the end (text; the same data goes out as JSON with --json)."""

from __future__ import annotations


def format_summary(sm) -> str:
    m = sm.model
    lines = [
        "",
        f"cxr-batch score: {sm.seen:,} files seen, {sm.scored:,} scored, {sm.errors:,} errors"
        + (f", {sm.skipped:,} skipped" if sm.skipped else "")
        + (f", {sm.out_of_scope:,} out of scope" if getattr(sm, "out_of_scope", 0) else "")
        + (f", {sm.retry:,} to retry" if getattr(sm, "retry", 0) else "")
        + (f", {sm.already_done:,} already in the output (resumed)" if sm.already_done else ""),
        f"  input         {sm.listed:,} files from the {sm.listing.get('source', 'listing')}"
        + (f" (--limit: the first {sm.seen:,} by path)" if sm.seen < sm.listed else ""),
        f"  time          {sm.seconds:.1f} s  ({sm.images_per_s:.1f} images/s)",
        f"  model         {m['spec']}  (id {m['model_id']}, {m['arch']}, {m['image_size']} px, threshold {m['threshold']:.3f})"
        + ("" if m["trained"] else "  UNTRAINED HEAD"),
        _engine_line(sm.plan),
        f"  predictions   {sm.out}",
        f"  CAM PNGs      {sm.cam_dir or '(not written: --no-cams)'}",
    ]
    if sm.skipped:
        lines.append(f"  skipped       {_skipped_text(sm)}")
    if sm.errors:
        lines.append(f"  errors        rows with a non-null `error` column, e.g. "
                     f"pandas.read_parquet('{sm.out}').query('error.notna()')")
    lines += _ood_lines(sm)
    lines += _failure_lines(sm)
    lines += [f"  note          {n}" for n in sm.notes]
    return "\n".join(lines)


def _skipped_text(sm, shown: int = 8) -> str:
    """The skipped files by reason, the largest first: "7 not scored: Modality US 3, Modality CT 1, ..."."""
    by = sorted(getattr(sm, "skipped_by", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{reason} {n:,}" for reason, n in by[:shown])
    if len(by) > shown:
        text += f", {len(by) - shown:,} more reasons ({sum(n for _, n in by[shown:]):,} files)"
    return (f"{sm.skipped:,} not scored: {text}" if text else f"{sm.skipped:,} not scored") + \
        " (status 'skipped'; the DICOM gate's rules: docs/dicom-gate.md)"


def _ood_lines(sm) -> list[str]:
    m, lines = sm.model, []
    if m.get("ood_threshold") is not None:
        lines.append(f"  OOD check     threshold {m['ood_threshold']:.2f} on ood_score (docs/ood.md)")
    if getattr(sm, "out_of_scope", 0):
        lines.append(f"  out of scope  {sm.out_of_scope:,} files do not look like the model's training images: status"
                     " 'out_of_scope', no prediction (--ood flag keeps one, marked)")
    if getattr(sm, "flagged_out_of_scope", 0):
        lines.append(f"  out of scope  {sm.flagged_out_of_scope:,} scored files do not look like the model's training"
                     " images: marked in the out_of_scope column (--ood flag)")
    return lines


def _failure_lines(sm) -> list[str]:
    lines = []
    if getattr(sm, "retried", 0) or getattr(sm, "redone", 0):
        lines.append(f"  retried       {sm.retried:,} files scored on a retry pass after a transient failure"
                     + (f"; {sm.redone:,} 'retry' rows of earlier runs replaced" if sm.redone else ""))
    if getattr(sm, "poison", 0):
        lines.append(f"  poison        {sm.poison:,} files killed their worker each time they were read alone:"
                     " error rows, not retried")
    if getattr(sm, "unlisted", 0):
        lines.append(_unlisted_line(sm.listing))
    if getattr(sm, "retry", 0):
        lines.append(f"  INCOMPLETE    {sm.retry:,} files failed for a transient reason (I/O, a vanished folder, throttling,"
                     " no space, a dead worker) and have status 'retry': run the same command again to retry exactly"
                     " those (exit code 3)")
    return lines


def _unlisted_line(listing: dict) -> str:
    folders, entries = listing.get("unreadable_folders", 0), listing.get("unreadable_entries", 0)
    what = " and ".join(t for t in (f"{folders:,} folders" if folders else "",
                                    f"{entries:,} entries" if entries else "") if t)
    named = (listing.get("unlisted") or [])[:5]  # --json names more
    more = f", ... ({folders + entries:,} in all)" if folders + entries > len(named) else ""
    return (f"  INCOMPLETE    {what} could not be listed, after retries: {'; '.join(named)}{more}. Their files have"
            " no rows yet: fix the cause and run the same command again to list them again (exit code 3)")


def _engine_line(plan: dict) -> str:
    from ..jobs.score import DEVICE_DECODE_NOTE

    device = f"; {DEVICE_DECODE_NOTE}" if plan.get("decode_on") == "device" else ""
    if plan.get("engine") == "local":
        return (f"  engine        local (no Ray): the model in this process, {plan['torch_threads']} threads;"
                f" {plan['workers']} decode/finish process(es){device}")
    return (f"  model actors  {plan['actors']} x {plan['cpus_per_actor']:g} CPU"
            + (f" + {plan['gpus_per_actor']:g} GPU" if plan.get("gpus_per_actor") else "") + device)


def _calibration_line(t: dict) -> str:
    line = f"temperature {t.get('temperature', 1.0):.3f} ({t.get('temperature_note', 'not fitted')})"
    if t.get("val_ece_before") is not None:
        line += f"; val ECE {t['val_ece_before']:.3f} -> {t['val_ece_after']:.3f} (10 bins); threshold on calibrated P"
    return line


def format_train_summary(t: dict) -> str:
    auc = "n/a" if t["val_auc"] is None else f"{t['val_auc']:.3f}"
    lines = ["", f"cxr-batch train: {t['epochs']} epochs in {t['seconds']:.0f} s"
             f" ({t['images_per_s_per_worker']:.1f} images/s per worker)",
             f"  best epoch    {t['best_epoch']}: val AUC {auc}, val accuracy {t['val_acc']:.3f}, threshold {t['threshold']:.3f}",
             f"  validation    {t['validation']} (files: {t.get('val_files', 'n/a')})",
             f"  calibration   {_calibration_line(t)}",
             f"  checkpoint    {t['best_checkpoint']}"]
    if t.get("ood"):
        o = t["ood"]
        lines.append(f"  OOD check     threshold {o['threshold']:.2f}: the {o['percentile']:g}th percentile of the"
                     f" {o['n_val']} validation images' ood_score (features fitted on {o['n_train']} training images)")
    if t.get("still_learning"):
        lines.append(f"  note          {t['still_learning']}")
    if t.get("weak"):
        lines.append(f"  WEAK MODEL    {t['weak']}: check the data and the recipe before scoring with it")
    if t.get("not_registered"):
        lines.append(f"  registered    {t['not_registered']}")
    if t.get("registered_as_default"):
        lines.append("  registered    as the default model of `cxr-batch score` (--no-register to skip)")
    return "\n".join(lines)


# Kermany et al. 2018 (Cell), transfer learning on the public pediatric pneumonia set: the bar to compare with.
PUBLISHED_BAR = "accuracy 0.928, AUC 0.968 (Kermany et al. 2018)"


def format_eval_summary(m: dict, out: str) -> str:
    k, ci = m["metrics"], m["ci95"]

    def f(key):
        return "n/a" if k.get(key) is None else f"{k[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if ci.get(key) else f"{k[key]:.3f}"

    lines = ["", f"cxr-batch evaluate: {m['n_scored']} labelled images, threshold {m['threshold']:.3f}",
             f"  accuracy {f('accuracy')}   AUC {f('roc_auc')}",
             f"  sensitivity {f('sensitivity')}   specificity {f('specificity')}",
             f"  published     {PUBLISHED_BAR} on the reference set's test split"]
    from ..jobs.train_config import WEAK_VAL_AUC  # one bar for a weak model, in training and here

    if k.get("roc_auc") is not None and k["roc_auc"] < WEAK_VAL_AUC:
        lines.append(f"  WEAK MODEL    AUC {k['roc_auc']:.3f} is below {WEAK_VAL_AUC:g} (chance 0.5): do not score with it"
                     " before the data and the recipe are checked")
    pt = (m.get("pointing") or {}).get("true_positives")
    if pt:
        point = {"map": " (the map's hot spot)", "evidence": " (its evidence in the image)"}.get(m["pointing"].get("cam_point"), "")
        lines.append(f"  CAM pointing  {pt['hits']}/{pt['n']} ({pt['rate']:.0%}) of true positives peak on the lesion{point};"
                     f" mean offset dx {pt['mean_dx_in_radii']:+.2f}, dy {pt['mean_dy_in_radii']:+.2f} lesion radii")
        if pt.get("follow_y") is not None:
            lines.append(f"                peaks follow the lesions by {pt['follow_x']:.2f} across, {pt['follow_y']:.2f} down"
                         " (1 = exactly; below 1 = pulled towards the middle)")
    lines += _eval_calibration_lines(m)
    lines += _eval_ood_lines(m)
    lines.append(f"  report        {out}/report.html (open it in a browser; also report.md, metrics.json and the PNG plots)")
    return "\n".join(lines)


def _eval_calibration_lines(m: dict) -> list[str]:
    lines = []
    c = m.get("calibration")
    if c:
        lines.append(f"  calibration   ECE (10 bins) {c['ece_before']:.3f} [{c['ece_before_ci95'][0]:.3f}, {c['ece_before_ci95'][1]:.3f}]"
                     f" at T=1 -> {c['ece_after']:.3f} [{c['ece_after_ci95'][0]:.3f}, {c['ece_after_ci95'][1]:.3f}]"
                     f" at T={c['temperature']:.2f}")
    d = m.get("deletion")
    if d and d.get("n_images"):
        lines.append(f"  CAM deletion  area {d['auc_cam']:.3f} (CAM order) vs {d['auc_random']:.3f} (random), gap"
                     f" {d['auc_difference']:.3f} [{d['auc_difference_ci95'][0]:.3f}, {d['auc_difference_ci95'][1]:.3f}]"
                     f" on {d['n_images']} PNEUMONIA images")
    return lines


def _eval_ood_lines(m: dict) -> list[str]:
    lines = []
    if m.get("n_out_of_scope"):
        lines.append(f"  out of scope  {m['n_out_of_scope']} of FOLDER's images (no prediction; not in the metrics above)")
    o = m.get("ood_check")
    if o:
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        auc = "n/a" if o["auroc"] is None else f"{o['auroc']:.3f}"
        lines.append(f"  OOD check     {pct(o['share_refused'])} of {o['folder']} refused ({o['n_out_of_scope']} out of"
                     f" scope, {o['n_skipped']} skipped, {o['n_scored']} scored, {o['n_error']} unreadable);"
                     f" {pct(o['share_wrongly_out_of_scope'])} of FOLDER wrongly out of scope; AUROC {auc}")
    return lines
