"""The backup's asset-check judgements: pass/fail and the text a user reads, decided here, not in Dagster."""

from __future__ import annotations


from idp_pipelines.backup.restore import DrillReport
from idp_pipelines.backup.verify import VerifyReport
from idp_pipelines.checks import Judgement

BACKUP_INTACT = "backup_intact"
BACKUP_COVERAGE = "backup_coverage"
RESTORE_DRILL = "restore_drill"

_SHOWN = 10


def _more(n: int) -> str:
    return f"; and {n - _SHOWN} more (see the metadata)" if n > _SHOWN else ""


def judge_verification(report: VerifyReport, target: str) -> Judgement:
    scope = ("the whole snapshot" if report.full else
             f"a slice of {report.slice.describe()} (every file within backup.verify_days runs)")
    head = (f"{target}/{report.snapshot}: re-hashed {report.hashed} file(s), {report.hashed_bytes / 1e6:,.1f} MB, "
            f"{scope}; every file's presence and size checked")
    if not report.findings:
        return Judgement(BACKUP_INTACT, True, head + ": all intact.")
    lines = [f"{f['file']}: {f['problem']} (expected {f['expected']}, found {f['actual']}); used by "
             f"{', '.join(f['models']) or 'no model of the inventory'}" for f in report.findings[:_SHOWN]]
    return Judgement(BACKUP_INTACT, False, (
        f"{head}: {len(report.findings)} problem(s): " + "; ".join(lines) + _more(len(report.findings))
        + ". Fix: make a new snapshot (materialise cache_backup: unchanged files are linked from the damaged "
          "snapshot, so delete the damaged files on the target first, or the whole snapshot) and check the "
          "target's disks."))


def judge_coverage(gaps: list[dict], snapshot: str, cache_dir: str, cache_files: int) -> Judgement:
    if not gaps:
        return Judgement(BACKUP_COVERAGE, True,
                         f"all {cache_files} blob(s) and GGUF file(s) of {cache_dir} are in snapshot {snapshot} "
                         "with the same size.")
    shown = "; ".join(f"{g['file']} ({g['problem']})" for g in gaps[:_SHOWN])
    return Judgement(BACKUP_COVERAGE, False, (
        f"{len(gaps)} of {cache_files} blob(s)/GGUF file(s) of {cache_dir} are not in snapshot {snapshot} as they "
        f"are in the cache: {shown}{_more(len(gaps))}. Fix: materialise cache_backup again; if they stay missing, "
        "look for an exclude rule or a tool honouring CACHEDIR.TAG between the cache and the target."))


def judge_drill(report: DrillReport, target: str) -> Judgement:
    if report.repo_id is None:
        return Judgement(RESTORE_DRILL, False, f"{target}/{report.snapshot}: {report.problems[0]}: nothing proves a "
                         "restore works. Fix: materialise hub_model, then cache_backup.", "WARN")
    head = (f"restored {report.repo_id} from {target}/{report.snapshot} into a temporary cache "
            f"({report.files} file(s), {report.bytes / 1e6:,.1f} MB)")
    if not report.problems:
        return Judgement(RESTORE_DRILL, True, head + ": huggingface_hub scans it without errors, every blob has the "
                         "hash its name says, and the model loads offline.")
    return Judgement(RESTORE_DRILL, False, f"{head}: " + "; ".join(report.problems[:_SHOWN])
                     + _more(len(report.problems)) + ". Fix: run backup_verification with full: true to find the "
                     "damage, then make a new snapshot.")
